"""MRML nodes <-> the files the worker reads and writes, without side effects on the scene: every
temporary node is removed again, the template segmentation is only read."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import vtk

import slicer

from .Jobs import LabelInfo


def moduleLogic(name: str):
    """Logic of a core module (segmentations, volumes, markups) from slicer.modules."""
    return getattr(slicer.modules, name).logic()


class SceneGuard:
    """Removes every node added to the scene inside the block, except those passed to keep().
    With ``keepOnSuccess=True`` the new nodes stay when the block ends without an exception."""

    def __init__(self, scene, keepOnSuccess=False):
        self.scene = scene
        self.keepOnSuccess = keepOnSuccess
        self.kept = set()

    def keep(self, node):
        if node is not None:
            self.kept.add(node.GetID())
            for i in range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0):
                display = node.GetNthDisplayNode(i)
                if display is not None:
                    self.kept.add(display.GetID())
        return node

    def _ids(self):
        return {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}

    def __enter__(self):
        self.before = self._ids()
        return self

    def __exit__(self, excType, exc, tb):
        if exc is None and self.keepOnSuccess:
            return False
        for nodeID in self._ids() - self.before - (self.kept if exc is None else set()):
            node = self.scene.GetNodeByID(nodeID)
            if node is not None:
                self.scene.RemoveNode(node)
        return False


def segmentIdsOf(segmentationNode) -> list:
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def writeVolume(volumeNode, path) -> Path:
    """Write a scalar volume (voxels and geometry, not its parent transform) with MRML's storage node."""
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("the input volume has no image data")
    components = volumeNode.GetImageData().GetNumberOfScalarComponents()
    if components != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has {components} components; "
                         "a scalar (grey-level) volume is needed")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(0)
    if not storage.WriteData(volumeNode):
        raise OSError(f"could not write volume '{volumeNode.GetName()}' to {path}")
    return Path(path)


def exportTemplate(segmentationNode, referenceVolume, segmentIds=None, path=None):
    """The chosen template segments as one label map on the reference volume's geometry (values 1..K
    in the order of segmentIds). Returns (labels, fingerprint): the fingerprint is a hash of the painted
    voxels, the segment IDs and the geometry, so an adapter trained on it is reused only while the
    painting is unchanged. Writes the label map to path when given. Raises ValueError when a segment
    has no painted voxel."""
    if segmentationNode is None:
        raise ValueError("no template segmentation selected")
    if referenceVolume is None:
        raise ValueError("no input volume selected")
    allIds = segmentIdsOf(segmentationNode)
    segmentIds = list(segmentIds) if segmentIds else allIds
    if not segmentIds:
        raise ValueError(f"template segmentation '{segmentationNode.GetName()}' has no segments; "
                         "paint at least one structure on one slice with the Segment Editor")
    unknown = [s for s in segmentIds if s not in allIds]
    if unknown:
        raise ValueError(f"segments {unknown} are not in '{segmentationNode.GetName()}'")
    segmentation = segmentationNode.GetSegmentation()
    labels = []
    for value, segmentId in enumerate(segmentIds, start=1):
        source = segmentation.GetSegment(segmentId)
        copy = slicer.vtkSegment()
        copy.DeepCopyMetadata(source)
        labels.append(LabelInfo(value, segmentId, source.GetName(), tuple(source.GetColor()), copy))

    scene = slicer.mrmlScene
    ids = vtk.vtkStringArray()
    for segmentId in segmentIds:
        ids.InsertNextValue(segmentId)
    with SceneGuard(scene):  # the temporary label map and its display/colour nodes go away
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__FewShotSegmentTemplate__")
        labelmap.SetHideFromEditors(True)
        if not moduleLogic("segmentations").ExportSegmentsToLabelmapNode(
                segmentationNode, ids, labelmap, referenceVolume):
            raise ValueError(f"could not export template '{segmentationNode.GetName()}' on the geometry "
                             f"of '{referenceVolume.GetName()}'")
        array = slicer.util.arrayFromVolume(labelmap)
        counts = {label.value: int((array == label.value).sum()) for label in labels}
        empty = [label.name for label in labels if counts[label.value] == 0]
        if empty:
            raise ValueError(f"template segments {empty} have no painted voxels inside volume "
                             f"'{referenceVolume.GetName()}'; paint them on at least one slice")
        ijkToRAS = vtk.vtkMatrix4x4()
        labelmap.GetIJKToRASMatrix(ijkToRAS)
        digest = hashlib.sha256()
        digest.update(repr((segmentIds, array.shape, str(array.dtype),
                            [round(ijkToRAS.GetElement(r, c), 6) for r in range(3) for c in range(4)])).encode())
        digest.update(array.tobytes())
        if path is not None:
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            storage.SetUseCompression(1)
            if not storage.WriteData(labelmap):
                raise OSError(f"could not write the template label map to {path}")
    return labels, digest.hexdigest()


def importLabelmapAsSegmentation(labelmapPath, referenceVolume, labels, name):
    """Read a label map file and import it into a NEW segmentation node: one segment per label
    (empty when nothing was found), with the template segment's ID, name, colour and terminology.
    The node follows the reference volume's parent transform."""
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(labelmapPath))
    if not storage.ReadData(labelmap) or labelmap.GetImageData() is None:
        raise OSError(f"could not read the result label map {labelmapPath}")
    values = slicer.util.arrayFromVolume(labelmap)
    maxValue = int(values.max()) if values.size else 0
    byValue = {label.value: label for label in labels}
    for value in range(1, max([maxValue] + list(byValue)) + 1):
        if value not in byValue:
            byValue[value] = LabelInfo.fromJson(value, {"name": f"Label_{value}"})
    ids = vtk.vtkStringArray()
    for value in sorted(byValue):
        ids.InsertNextValue(byValue[value].segmentId)

    scene = slicer.mrmlScene
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
    if not moduleLogic("segmentations").ImportLabelmapToSegmentationNode(labelmap, segmentationNode, ids):
        raise OSError(f"could not import {labelmapPath} into a segmentation")
    segmentation = segmentationNode.GetSegmentation()
    for value in sorted(byValue):
        label = byValue[value]
        segment = segmentation.GetSegment(label.segmentId)
        if segment is None:
            continue
        if label.segment is not None:
            segment.DeepCopyMetadata(label.segment)   # name, colour, terminology and other tags
        else:
            segment.SetName(label.name)
            segment.SetColor(*label.color)
        segment.SetLabelValue(value)
    segmentationNode.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
    return segmentationNode


def importLandmarks(path, referenceVolume, name):
    """Load a .mrk.json point list into a NEW markups node (no storage node pointing at the
    temporary file is left behind)."""
    scene = slicer.mrmlScene
    nodeID = moduleLogic("markups").LoadMarkups(str(path), scene.GenerateUniqueName(name))
    node = scene.GetNodeByID(nodeID) if nodeID else None
    if node is None:
        raise OSError(f"could not read the landmarks file {path}")
    storage = node.GetStorageNode()
    if storage is not None:
        node.SetAndObserveStorageNodeID(None)
        scene.RemoveNode(storage)
    node.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
    return node


def importVolume(path, referenceVolume, name):
    """Read a volume file (e.g. the worker's uncertainty map) into a NEW scalar volume node that
    follows the reference volume's parent transform; no storage node points at the file."""
    scene = slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise OSError(f"could not read the volume {path}")
    node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
    return node


def replaceVolumeContent(targetNode, sourceNode):
    """Give targetNode sourceNode's voxels and geometry (the node and its display stay)."""
    ijkToRAS = vtk.vtkMatrix4x4()
    sourceNode.GetIJKToRASMatrix(ijkToRAS)
    targetNode.SetIJKToRASMatrix(ijkToRAS)
    targetNode.SetAndObserveImageData(sourceNode.GetImageData())
    targetNode.SetAndObserveTransformNodeID(sourceNode.GetTransformNodeID())


def replaceSegments(targetNode, sourceNode):
    """Make targetNode hold exactly sourceNode's segments (IDs, metadata, voxels); the node itself,
    its ID and display node stay, so views and selectors keep showing it."""
    target = targetNode.GetSegmentation()
    target.RemoveAllSegments()
    for segmentId in segmentIdsOf(sourceNode):
        if not target.CopySegmentFromSegmentation(sourceNode.GetSegmentation(), segmentId, False):
            raise OSError(f"could not copy segment '{segmentId}' into '{targetNode.GetName()}'")
    targetNode.SetAndObserveTransformNodeID(sourceNode.GetTransformNodeID())


def replaceControlPoints(targetNode, sourceNode):
    """Make targetNode hold exactly sourceNode's control points (labels and world positions)."""
    targetNode.RemoveAllControlPoints()
    targetNode.SetAndObserveTransformNodeID(sourceNode.GetTransformNodeID())
    for i in range(sourceNode.GetNumberOfControlPoints()):
        position = [0.0, 0.0, 0.0]
        sourceNode.GetNthControlPointPosition(i, position)
        index = targetNode.AddControlPoint(position, sourceNode.GetNthControlPointLabel(i))
        targetNode.SetNthControlPointDescription(index, sourceNode.GetNthControlPointDescription(i))


def labelsFromSegFile(path) -> list:
    """Names and colours the worker wrote into its .seg.nrrd (used when predicting with an adapter
    that has no labels side file)."""
    try:
        node = slicer.vtkMRMLSegmentationNode()
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            return []
        segmentation = node.GetSegmentation()
        labels = []
        for i in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(i)
            copy = slicer.vtkSegment()
            copy.DeepCopyMetadata(segment)
            value = segment.GetLabelValue() or (i + 1)
            labels.append(LabelInfo(value, segmentation.GetNthSegmentID(i), segment.GetName(),
                                    tuple(segment.GetColor()), copy))
        return labels
    except Exception:
        logging.exception("FewShotSegment: could not read segment names from the worker's .seg.nrrd")
        return []
