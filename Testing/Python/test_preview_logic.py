"""The preview/accept loop of the Logic on real MRML (slicer-core), with the stand-in worker of
fake_worker.py (fast, no torch): Propagate uses the current painting, one preview node is updated in
place, Accept/Discard, finished segments, the template never changes, suggested slices, waiting."""
from __future__ import annotations

import json

import numpy as np
import pytest
import slicer

import fake_worker


@pytest.fixture
def runs():
    return []


@pytest.fixture
def scene(fss, mrml, logic, runs):
    """The self-test's synthetic volume and template (blob, ball painted on slice 16), a parameter
    node pointing at them and the Logic driving the stand-in worker."""
    from FewShotSegmentSlicer.SelfTest import makeSyntheticScene

    volume, template, truth = makeSyntheticScene()
    logic.processFactory = fake_worker.factory(runs)
    logic.eventHook = None
    pn = logic.getParameterNode()
    pn.inputVolume, pn.templateSegmentation = volume, template
    pn.cacheFeatures = False
    return type("Scene", (), dict(volume=volume, template=template, pn=pn, scene=mrml.scene))


def dataNodes(scene):
    """IDs of the segmentations and point lists (slicer.util's array helpers leave display nodes of
    temporary label maps behind, so whole-scene lists are not compared here)."""
    return sorted(n.GetID() for cls in ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode")
                  for n in slicer.util.getNodesByClass(cls, scene))


def segmentArray(node, segmentId, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volume) > 0


def templateState(template, volume):
    return {s: segmentArray(template, s, volume).copy() for s in ("blob", "ball")}


def test_propagate_updates_one_preview_in_place_and_follows_the_painting(fss, scene, logic, runs):
    pn, volume, template = scene.pn, scene.volume, scene.template
    before = templateState(template, volume)

    first = logic.propagate(pn, wait=True)
    preview = pn.previewSegmentation
    assert runs[-1].task == "run"
    assert preview is not None and preview.GetID() == first.segmentationNode.GetID()
    assert preview.GetAttribute("FewShotSegment.Preview") == "1" and "preview" in preview.GetName()
    assert fss.FewShotSegmentLogic.templateSegmentIds(preview) == ["blob", "ball"]
    assert segmentArray(preview, "blob", volume)[5].any()  # propagated beyond the painted slice 16
    assert pn.adapterFile and pn.adapterTemplateHash
    landmarks = pn.previewLandmarks
    assert sorted(landmarks.GetNthControlPointLabel(i) for i in range(landmarks.GetNumberOfControlPoints())) == [
        "ball", "blob"]
    nodesAfterFirst = dataNodes(scene.scene)

    # painting unchanged: the trained adapter is reused, with the painting (it anchors the result as
    # in the run), and the SAME preview node is updated
    logic.propagate(pn, wait=True)
    assert runs[-1].task == "predict" and runs[-1].job["model"].endswith(".pt")
    assert np.array_equal(runs[-1].painting > 0, before["blob"] | before["ball"])
    assert pn.previewSegmentation.GetID() == preview.GetID()
    assert dataNodes(scene.scene) == nodesAfterFirst

    # new painting on another slice: trains again on it, preview updated in place with the new voxels
    painted = np.zeros(slicer.util.arrayFromVolume(volume).shape, dtype=np.uint8)
    painted[16] = before["blob"][16]
    painted[20, 40:44, 5:9] = 1  # a blob stroke outside its slice-16 outline
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, template, "blob", volume)
    logic.propagate(pn, wait=True)
    assert runs[-1].task == "run"
    assert pn.previewSegmentation.GetID() == preview.GetID()
    assert segmentArray(preview, "blob", volume)[3, 41, 6]  # the new stroke, propagated along k
    assert dataNodes(scene.scene) == nodesAfterFirst

    # a setting that changes training also retrains; the saved adapter applies when asked explicitly
    pn.adapter = "basic"
    logic.propagate(pn, wait=True)
    assert runs[-1].task == "run"
    pn.useAdapterFile = True
    pn.adapter = "classification"
    logic.propagate(pn, wait=True)
    assert runs[-1].task == "predict"
    # the template itself was only read
    assert segmentArray(template, "ball", volume).sum() == before["ball"].sum()


def test_train_adapter_for_other_patients_is_not_reused_by_propagate(fss, scene, logic, runs, tmp_path):
    """Train's adapter is made for other patients (body position as input, no painting to anchor
    it); Propagate on the painted volume trains its own even with the same painting and settings."""
    pn = scene.pn
    logic.train(pn.inputVolume, pn.templateSegmentation, modelPath=tmp_path / "adapter.pt", wait=True,
                parameterNode=pn)
    assert runs[-1].task == "train" and pn.adapterFile and pn.adapterTemplateHash
    logic.propagate(pn, wait=True)
    assert runs[-1].task == "run"
    logic.propagate(pn, wait=True)          # now the run's adapter, painting unchanged: reused
    assert runs[-1].task == "predict" and runs[-1].job.get("template")


def test_accept_copies_into_new_or_chosen_segmentation_and_keeps_finished_segments(fss, scene, logic):
    pn, volume, template = scene.pn, scene.volume, scene.template
    before = templateState(template, volume)
    logic.propagate(pn, wait=True)
    preview = pn.previewSegmentation
    previewBlob = segmentArray(preview, "blob", volume)

    target, copied, skipped = logic.acceptPreview(pn)
    assert copied == ["blob", "ball"] and skipped == []
    assert target.GetID() != template.GetID() and scene.scene.GetNodeByID(preview.GetID()) is None
    assert pn.previewSegmentation is None and pn.outputSegmentation.GetID() == target.GetID()
    assert np.array_equal(segmentArray(target, "blob", volume), previewBlob)
    assert target.GetSegmentation().GetSegment("blob").GetName() == "blob"
    assert pn.outputLandmarks.GetNumberOfControlPoints() == 2

    # a second round into the same output: the finished segment stays as it is, the other is replaced
    finishedBall = np.zeros_like(previewBlob)
    finishedBall[10:12, 30:34, 40:44] = True
    slicer.util.updateSegmentBinaryLabelmapFromArray(finishedBall.astype(np.uint8), target, "ball", volume)
    logic.setSegmentFinished(target, "ball")
    slicer.util.updateSegmentBinaryLabelmapFromArray(np.zeros_like(previewBlob, dtype=np.uint8), target, "blob", volume)
    logic.propagate(pn, wait=True)
    target2, copied, skipped = logic.acceptPreview(pn)
    assert target2.GetID() == target.GetID()
    assert copied == ["blob"] and skipped == ["ball"]
    assert np.array_equal(segmentArray(target, "ball", volume), finishedBall)
    assert np.array_equal(segmentArray(target, "blob", volume), previewBlob)

    # the template is never an output
    logic.propagate(pn, wait=True)
    with pytest.raises(ValueError, match="template segmentation is never changed"):
        logic.acceptPreview(pn, targetNode=template)
    assert pn.previewSegmentation is not None
    after = templateState(template, volume)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert fss.FewShotSegmentLogic.templateSegmentIds(template) == ["blob", "ball"]


def test_discard_removes_the_preview_and_undo_brings_it_back(scene, logic):
    pn = scene.pn
    before = dataNodes(scene.scene)
    logic.propagate(pn, wait=True)
    previewId = pn.previewSegmentation.GetID()
    assert previewId in dataNodes(scene.scene)

    scene.scene.SetUndoOn()
    assert logic.discardPreview(pn)
    assert dataNodes(scene.scene) == before and pn.previewSegmentation is None
    assert not logic.discardPreview(pn)  # nothing left to discard
    with pytest.raises(ValueError, match="no preview to accept"):
        logic.acceptPreview(pn)
    scene.scene.Undo()
    assert scene.scene.GetNodeByID(previewId) is not None, "MRML undo did not restore the preview"


def test_uncertainty_map_is_one_preview_volume_updated_in_place(scene, logic, runs):
    pn = scene.pn
    volumes = lambda: sorted(n.GetID() for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode", scene.scene))
    logic.processFactory = fake_worker.factory(runs, uncertainty=10)
    logic.propagate(pn, wait=True)
    uncertainty = pn.previewUncertainty
    assert uncertainty is not None and uncertainty.GetID() != scene.volume.GetID()
    assert slicer.util.arrayFromVolume(uncertainty).max() == 10
    after = volumes()
    logic.processFactory = fake_worker.factory(runs, uncertainty=20)
    logic.propagate(pn, wait=True)
    assert pn.previewUncertainty.GetID() == uncertainty.GetID() and volumes() == after
    assert slicer.util.arrayFromVolume(uncertainty).max() == 20
    displayId = uncertainty.GetDisplayNodeID()
    assert logic.discardPreview(pn)
    assert scene.scene.GetNodeByID(uncertainty.GetID()) is None and scene.scene.GetNodeByID(displayId) is None
    assert pn.previewUncertainty is None


def test_suggested_slices_are_read_and_move_the_matching_slice_view(fss, scene, logic, runs):
    pn, volume = scene.pn, scene.volume
    suggestions = [{"slice": 7, "axis": "axial", "score": 0.9}, {"slice": 50, "axis": "sagittal", "score": 0.4}]
    logic.processFactory = fake_worker.factory(runs, suggest=suggestions)
    result = logic.propagate(pn, wait=True)
    assert result.suggestedSlices == suggestions

    views = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        node = scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
        node.SetLayoutName(name)
        node.SetDefaultOrientation(orientation)
        node.SetOrientation(orientation)
        views[name] = node
    for suggestion, view, axis in ((suggestions[0], "Red", 2), (suggestions[1], "Yellow", 0)):
        moved = logic.jumpToSuggestedSlice(volume, suggestion)
        assert moved is views[view]
        # the synthetic volume has its origin at 0 and no rotation: slice n lies at n * spacing
        offset = moved.GetSliceToRAS().GetElement(axis, 3)
        assert offset == pytest.approx(suggestion["slice"] * volume.GetSpacing()[axis], abs=1e-3), (view, offset)
    assert views["Green"].GetSliceToRAS().GetElement(1, 3) == 0.0  # the other view did not move


def test_library_suggestions_move_the_view_to_their_lps_position(fss, scene, logic, runs):
    """FewShotSegmentLib's format: {"axis", "slices": [{"index", "position_lps", "score", "labels"}]};
    the index is on the library's canonical volume, so the view goes to position_lps."""
    k = 9  # the synthetic volume: RAS = (1.5 i, 1.5 j, 2.5 k), so LPS of slice k's centre is below
    suggestions = {"axis": "axial", "slices": [
        {"index": k, "position_lps": [-48.0, -48.0, k * 2.5], "score": 12.5, "labels": ["blob"]},
        {"index": "not a number", "score": 3.0}]}
    logic.processFactory = fake_worker.factory(runs, suggest=suggestions)
    result = logic.propagate(scene.pn, wait=True)
    assert result.suggestedSlices == [{"slice": k, "axis": "axial", "score": 12.5,
                                       "position_lps": [-48.0, -48.0, 22.5], "labels": ["blob"]}]
    views = {}
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal")):
        views[name] = scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
        views[name].SetLayoutName(name)
        views[name].SetDefaultOrientation(orientation)
        views[name].SetOrientation(orientation)
    assert logic.jumpToSuggestedSlice(scene.volume, result.suggestedSlices[0]) is views["Red"]
    assert views["Red"].GetSliceToRAS().GetElement(2, 3) == pytest.approx(22.5)


def test_missing_or_malformed_suggestions_are_ignored(tmp_path):
    from FewShotSegmentSlicer import Preview

    assert Preview.readSuggestedSlices(tmp_path / "suggested_slices.json") == []
    path = tmp_path / "suggested_slices.json"
    path.write_text("{not json")
    assert Preview.readSuggestedSlices(path) == []
    path.write_text(json.dumps([{"slice": "x"}, {"axis": "oblique", "slice": 3}, {"slice": 4, "axis": "coronal"}]))
    assert Preview.readSuggestedSlices(path) == [{"slice": 4, "axis": "coronal", "score": 0.0}]


def test_wait_processes_events_while_the_worker_runs(scene, logic, runs):
    calls = []
    logic.processFactory = fake_worker.factory(runs, pollsBeforeExit=5)
    logic.eventHook = lambda: calls.append(runs[-1].returncode)
    logic.propagate(scene.pn, wait=True)
    assert len(calls) >= 4 and all(code is None for code in calls), calls  # called while it ran


def test_default_event_hook_is_qt_processing_only_inside_the_app(monkeypatch):
    from FewShotSegmentSlicer import Logic

    monkeypatch.delattr(slicer, "app", raising=False)
    assert Logic.defaultEventHook() is None
    processed = []
    monkeypatch.setattr(slicer, "app", type("App", (), {"processEvents": lambda self: processed.append(1)})(),
                        raising=False)
    Logic.defaultEventHook()()
    assert processed == [1]


def test_dinov2_with_litemedsam_refinement_is_refused_before_any_work(scene, logic, runs):
    pn = scene.pn
    pn.backbone = "dinov2"
    with pytest.raises(ValueError, match="DINOv2 choose refinement 'none' or give a segment-anything SAM"):
        logic.propagate(pn)
    assert runs == [] and logic.job is None
    assert not logic.temporaryRoot.exists() or not any(logic.temporaryRoot.iterdir())
    pn.refine = "none"
    logic.propagate(pn, wait=True)
    assert runs[-1].job["config"]["backbone"] == "dinov2" and runs[-1].job["config"]["refine"] == "none"
