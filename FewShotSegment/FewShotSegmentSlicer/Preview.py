"""The preview/accept loop on MRML nodes: one preview segmentation is updated in place by every
propagation; Accept copies its segments into a new or chosen segmentation (never the template, never
over a segment marked finished); Discard removes it. Each change is an MRML undo step where the scene
has undo switched on. Also: moving a slice view to a slice the library suggests."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import vtk

import slicer

from .MrmlConversion import segmentIdsOf

PREVIEW_ATTRIBUTE = "FewShotSegment.Preview"
FINISHED_TAG = "FewShotSegment.Finished"  # a segment tag: Accept never overwrites this segment
AXIS_INDEX = {"axial": 2, "coronal": 1, "sagittal": 0}  # IJK axis along which the library slices


def saveUndoState(scene):
    """One undo step before a change, where the scene supports and enables MRML undo."""
    if hasattr(scene, "SaveStateForUndo") and getattr(scene, "GetUndoFlag", lambda: False)():
        scene.SaveStateForUndo()


def enableUndo(*nodes):
    """Let MRML undo record these nodes (off by default for most node classes)."""
    for node in nodes:
        if node is not None and hasattr(node, "SetUndoEnabled"):
            node.SetUndoEnabled(True)


def isFinished(segmentationNode, segmentId) -> bool:
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    return segment is not None and segment.HasTag(FINISHED_TAG)


def setFinished(segmentationNode, segmentId, finished=True):
    """Mark a segment of an output segmentation as finished (Accept then leaves it alone) or not."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise ValueError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
    if finished:
        segment.SetTag(FINISHED_TAG, "1")
    else:
        segment.RemoveTag(FINISHED_TAG)


def markAsPreview(segmentationNode, name):
    segmentationNode.SetName(slicer.mrmlScene.GenerateUniqueName(name))
    segmentationNode.SetAttribute(PREVIEW_ATTRIBUTE, "1")
    enableUndo(segmentationNode, *[segmentationNode.GetNthDisplayNode(i)
                                   for i in range(segmentationNode.GetNumberOfDisplayNodes())])


def accept(previewNode, targetNode=None, templateNode=None, referenceVolume=None, name="few-shot",
           previewLandmarks=None, targetLandmarks=None):
    """Copy the preview's segments into targetNode (a new segmentation named `name` when None).
    A target segment with the same ID is replaced unless it is marked finished. The template is never
    a target. Returns (targetNode, targetLandmarks, copied segment IDs, skipped segment IDs)."""
    scene = slicer.mrmlScene
    if previewNode is None or scene.GetNodeByID(previewNode.GetID()) is None:
        raise ValueError("there is no preview to accept; Propagate first")
    if templateNode is not None and targetNode is not None and targetNode.GetID() == templateNode.GetID():
        raise ValueError("the template segmentation is never changed; choose another output segmentation")
    if targetNode is not None and targetNode.GetID() == previewNode.GetID():
        raise ValueError("the output segmentation must not be the preview itself")
    saveUndoState(scene)
    if targetNode is None:
        targetNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        targetNode.CreateDefaultDisplayNodes()
        if referenceVolume is not None:
            targetNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
        targetNode.SetAndObserveTransformNodeID(previewNode.GetTransformNodeID())
        enableUndo(targetNode, targetNode.GetDisplayNode())
    source, target = previewNode.GetSegmentation(), targetNode.GetSegmentation()
    copied, skipped = [], []
    for segmentId in segmentIdsOf(previewNode):
        if target.GetSegment(segmentId) is not None:
            if isFinished(targetNode, segmentId):
                skipped.append(segmentId)
                continue
            target.RemoveSegment(segmentId)
        if not target.CopySegmentFromSegmentation(source, segmentId, False):
            raise OSError(f"could not copy segment '{segmentId}' into '{targetNode.GetName()}'")
        copied.append(segmentId)
    if previewLandmarks is not None and previewLandmarks.GetNumberOfControlPoints():
        targetLandmarks = _acceptLandmarks(previewLandmarks, targetLandmarks, f"{name} landmarks",
                                           {source.GetSegment(s).GetName() for s in skipped})
    return targetNode, targetLandmarks, copied, skipped


def _acceptLandmarks(previewLandmarks, targetLandmarks, name, keepLabels):
    """Points of the preview replace the target's points of the same label, except for the labels of
    finished segments."""
    scene = slicer.mrmlScene
    if targetLandmarks is None:
        targetLandmarks = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
        targetLandmarks.CreateDefaultDisplayNodes()
        targetLandmarks.SetAndObserveTransformNodeID(previewLandmarks.GetTransformNodeID())
    newLabels = {previewLandmarks.GetNthControlPointLabel(i) for i in range(previewLandmarks.GetNumberOfControlPoints())}
    for i in reversed(range(targetLandmarks.GetNumberOfControlPoints())):
        label = targetLandmarks.GetNthControlPointLabel(i)
        if label in newLabels and label not in keepLabels:
            targetLandmarks.RemoveNthControlPoint(i)
    existing = {targetLandmarks.GetNthControlPointLabel(i) for i in range(targetLandmarks.GetNumberOfControlPoints())}
    for i in range(previewLandmarks.GetNumberOfControlPoints()):
        label = previewLandmarks.GetNthControlPointLabel(i)
        if label in existing:
            continue
        position = [0.0, 0.0, 0.0]
        previewLandmarks.GetNthControlPointPosition(i, position)
        targetLandmarks.AddControlPoint(position, label)
    return targetLandmarks


def discard(*nodes, undoStep=True) -> bool:
    """Remove the preview nodes and their display nodes from the scene (one undo step). False when
    there was nothing."""
    scene = slicer.mrmlScene
    present = [n for n in nodes if n is not None and scene.GetNodeByID(n.GetID()) is not None]
    if not present:
        return False
    if undoStep:
        saveUndoState(scene)
    for node in present:
        displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        scene.RemoveNode(node)
        for display in displays:
            if display is not None and scene.GetNodeByID(display.GetID()) is not None:
                scene.RemoveNode(display)
    return True


def readSuggestedSlices(path) -> list:
    """The worker's suggested_slices.json, best first, as [{"slice", "axis", "score", ...}]: either
    {"axis": str, "slices": [{"index", "position_lps", "score", "labels"}]} (FewShotSegmentLib) or a
    plain list of {"slice", "axis", "score"}. [] when absent or unreadable (a missing suggestion never
    stops a result from loading); malformed entries are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logging.warning(f"FewShotSegment: ignoring unreadable {path.name}: {exc}")
        return []
    defaultAxis = data.get("axis", "axial") if isinstance(data, dict) else "axial"
    entries = data.get("slices", []) if isinstance(data, dict) else data
    suggestions = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        index, axis = entry.get("slice", entry.get("index")), entry.get("axis", defaultAxis)
        if not isinstance(index, int) or axis not in AXIS_INDEX:
            continue
        suggestion = {"slice": index, "axis": axis, "score": float(entry.get("score", 0.0))}
        position = entry.get("position_lps")
        if isinstance(position, list) and len(position) == 3 and all(isinstance(v, (int, float)) for v in position):
            suggestion["position_lps"] = [float(v) for v in position]
        if isinstance(entry.get("labels"), list):
            suggestion["labels"] = [str(label) for label in entry["labels"]]
        suggestions.append(suggestion)
    return suggestions


# normal of the anatomical planes in RAS: the library names its axes on the canonical volume
ANATOMICAL_NORMAL = {"axial": (0.0, 0.0, 1.0), "coronal": (0.0, 1.0, 0.0), "sagittal": (1.0, 0.0, 0.0)}


def suggestedSliceRAS(volumeNode, suggestion) -> tuple:
    """(RAS point on the suggested slice, RAS normal of that slice). The library gives the slice's
    centre in LPS (position_lps, in the volume's own coordinates); without it the index is taken
    along the volume's IJK axis matching the axis name."""
    transformToWorld = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(volumeNode.GetParentTransformNode(), None, transformToWorld)
    if "position_lps" in suggestion:
        x, y, z = suggestion["position_lps"]
        return tuple(transformToWorld.TransformPoint([-x, -y, z])), ANATOMICAL_NORMAL[suggestion["axis"]]
    dims = volumeNode.GetImageData().GetDimensions()
    axis = AXIS_INDEX[suggestion.get("axis", "axial")]
    index = min(max(int(suggestion["slice"]), 0), dims[axis] - 1)
    ijk = [(d - 1) / 2.0 for d in dims]
    ijk[axis] = index
    ijkToRAS = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRAS)
    ras = transformToWorld.TransformPoint(ijkToRAS.MultiplyPoint(ijk + [1.0])[:3])
    direction = [ijkToRAS.GetElement(row, axis) for row in range(3)]
    return tuple(ras), tuple(direction)


def jumpToSuggestedSlice(volumeNode, suggestion, sliceNodes=None):
    """Move the slice view that best cuts across the suggested axis (its normal most parallel to that
    axis) onto the suggested slice. Returns the slice node moved, or None when there is no view."""
    ras, direction = suggestedSliceRAS(volumeNode, suggestion)
    if sliceNodes is None:
        collection = slicer.mrmlScene.GetNodesByClass("vtkMRMLSliceNode")
        sliceNodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    norm = math.sqrt(sum(c * c for c in direction)) or 1.0
    best, bestScore = None, -1.0
    for sliceNode in sliceNodes:
        sliceToRAS = sliceNode.GetSliceToRAS()
        normal = [sliceToRAS.GetElement(row, 2) for row in range(3)]
        score = abs(sum(n * d for n, d in zip(normal, direction))) / norm
        if score > bestScore:
            best, bestScore = sliceNode, score
    if best is not None:
        best.JumpSliceByOffsetting(*ras)
    return best
