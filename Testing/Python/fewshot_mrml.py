"""Shared pieces of the FewShotSegment MRML tests: stand-ins for the parts of the Slicer application
that slicer-core lacks, the scene set-up, the CT test case and small helpers. Imported by conftest.py
(which installs the stand-ins before the module file is imported) and by the tests."""
from __future__ import annotations

import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[2]
# the CT and its reference labels ship with the module (Resources/SampleData): no ../shared needed
SAMPLE_DATA = REPO / "FewShotSegment" / "Resources" / "SampleData"
CT = SAMPLE_DATA / "example_ct.nii.gz"
CT_REFERENCE = SAMPLE_DATA / "example_seg_fast_force_split.nii.gz"
# label values of the reference map ("total" task of TotalSegmentator) and the template slice
CT_LABELS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}
CT_COLORS = {"liver": (0.86, 0.55, 0.40), "spleen": (0.62, 0.31, 0.64),
             "kidney_right": (0.35, 0.75, 0.45), "kidney_left": (0.98, 0.78, 0.35)}
TEMPLATE_SLICE = 90  # axial slice through the middle of the liver (z 69..111); all four organs on it
# A Slicer terminology entry for the liver (SNOMED CT codes), to check the output keeps it
LIVER_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list"
                     "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^"
                     "~Anatomic codes - DICOM master list~^^~^^")
FEATURE_CACHE = REPO / ".cache" / "features"

sys.path[:0] = [str(REPO / "FewShotSegment"), str(REPO)]


# ---------------------------------------------------------------- stand-ins for the application


def installStandIns():
    import slicer

    import qt_standins

    qt_standins.install()
    sys.modules.setdefault("ctk", mock.MagicMock(name="ctk"))

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    sys.modules["slicer.i18n"] = i18n
    slicer.i18n = i18n

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent if parent is not None else types.SimpleNamespace()

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            pass

        def resourcePath(self, filename):
            return str(REPO / "FewShotSegment" / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        """Same parameter-node behaviour as Slicer's: a singleton vtkMRMLScriptedModuleNode."""

        def __init__(self, parent=None):
            name = type(self).__name__
            self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name

        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node.SetName(scene.GenerateUniqueName(self.moduleName))
                node.SetAttribute("ModuleName", self.moduleName)
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=1000):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    def parameterNodeWrapper(cls):
        """Attribute access with the declared defaults (None for nodes); no GUI, no serialization."""
        names = list(cls.__dict__.get("__annotations__", {}))

        def __init__(self, parameterNode):
            self.parameterNode = parameterNode
            for name in names:
                setattr(self, name, cls.__dict__.get(name))

        cls.__init__ = __init__
        cls.connectGui = lambda self, ui: None
        cls.disconnectGui = lambda self, tag: None
        cls.parameterNames = names
        return cls

    pnw.Choice, pnw.WithinRange, pnw.parameterNodeWrapper = Choice, WithinRange, parameterNodeWrapper
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    slicer.parameterNodeWrapper = pnw


installStandIns()


def buildScene():
    """A scene with the application and module logics, registered as Slicer does at start-up."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colorLogic = appLogic.GetColorLogic()
    colorLogic.SetMRMLScene(scene)
    colorLogic.AddDefaultColorNodes()
    appLogic.SetModuleLogic("Colors", colorLogic)
    appLogic.SetSliceLogics(vtk.vtkCollection())
    appLogic.SetViewLogics(vtk.vtkCollection())
    logics = {}
    # Segmentations first: its SetMRMLScene registers the representation converters
    for name, cls in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("Markups", slicer.vtkSlicerMarkupsLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    return scene, appLogic, logics


def nodeIds(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def paintCtScene(scene, logics):
    """The CT, its reference labels (array) and a template segmentation painted on one axial slice:
    the reference labels of liver, spleen and both kidneys copied onto it."""
    import slicer

    if not CT.is_file():
        raise FileNotFoundError(f"bundled sample CT missing: {CT}")
    volumes = logics["volumes"]
    volume = volumes.AddArchetypeVolume(str(CT), "example_ct")
    referenceNode = volumes.AddArchetypeVolume(str(CT_REFERENCE), "reference", 1)
    reference = slicer.util.arrayFromVolume(referenceNode).copy()
    for i in range(referenceNode.GetNumberOfDisplayNodes()):
        scene.RemoveNode(referenceNode.GetNthDisplayNode(i))
    scene.RemoveNode(referenceNode.GetStorageNode())
    scene.RemoveNode(referenceNode)
    template = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "template")
    template.CreateDefaultDisplayNodes()
    template.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, value in CT_LABELS.items():
        segmentId = template.GetSegmentation().AddEmptySegment(name, name, CT_COLORS[name])
        painted = np.zeros(reference.shape, dtype=np.uint8)
        painted[TEMPLATE_SLICE] = reference[TEMPLATE_SLICE] == value
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted, template, segmentId, volume)
    template.GetSegmentation().GetSegment("liver").SetTerminology(LIVER_TERMINOLOGY)
    return volume, template, reference


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 2.0 * (a & b).sum() / total if total else 1.0


def workerAvailable():
    return (REPO / "FewShotSegmentLib" / "worker.py").is_file()


def fastConfig(**overrides):
    """Settings of the CI runs: the library's defaults on CPU, the shared feature cache."""
    config = {"device": "cpu", "cache_dir": str(FEATURE_CACHE)}
    config.update(overrides)
    return config


