"""The module's parameter node: everything the panel shows, saved with the scene.

Pipeline settings use the PipelineConfig field names of FewShotSegmentLib/config.py. Their allowed
values are repeated here because the module must import without the library's dependencies; a test
(Testing/Python/test_mrml_conversion.py) checks that both lists stay equal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

BACKBONES = ("litemedsam", "dinov2", "checkpoint")
ADAPTERS = ("basic", "classification", "contrastive")
AXES = ("auto", "stack", "axial", "coronal", "sagittal")
REFINEMENTS = ("none", "box", "points")
DEVICES = ("auto", "cpu", "cuda", "mps")
MODALITIES = ("auto", "ct", "mri")

# Parameter-node fields that are passed to the worker as PipelineConfig fields, same names.
CONFIG_PARAMETERS = ("backbone", "checkpoint", "adapter", "axis", "refine", "sam_checkpoint", "device",
                     "landmarks", "threshold", "epochs", "modality", "ct_window", "keep_components")


@parameterNodeWrapper
class FewShotSegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    templateSegmentation: vtkMRMLSegmentationNode
    # comma-separated segment IDs of the template to use; "" = all segments
    selectedSegmentIds: str = ""
    backbone: Annotated[str, Choice(list(BACKBONES))] = "litemedsam"
    checkpoint: Path = Path("")
    adapter: Annotated[str, Choice(list(ADAPTERS))] = "contrastive"
    axis: Annotated[str, Choice(list(AXES))] = "auto"
    refine: Annotated[str, Choice(list(REFINEMENTS))] = "box"
    sam_checkpoint: Path = Path("")
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    landmarks: bool = True
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    epochs: Annotated[int, WithinRange(1, 1000)] = 60
    modality: Annotated[str, Choice(list(MODALITIES))] = "auto"
    ct_window: str = "abdomen"
    keep_components: Annotated[int, WithinRange(0, 20)] = 0
    cacheFeatures: bool = True
    # The adapter trained by the last Train/Propagate (or chosen by the user) and the fingerprint of
    # the painting it was trained on: Propagate reuses it only while the painting is unchanged.
    adapterFile: Path = Path("")
    adapterTemplateHash: str = ""
    # True: the user chose to apply adapterFile (e.g. saved on another patient) instead of training
    useAdapterFile: bool = False
    # the preview of the last propagation (updated in place) and where Accept copies it
    previewSegmentation: vtkMRMLSegmentationNode
    previewLandmarks: vtkMRMLMarkupsFiducialNode
    previewUncertainty: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputLandmarks: vtkMRMLMarkupsFiducialNode


def pathString(value) -> str:
    """'' for an unset path (parameterNodeWrapper stores an empty Path as '.')."""
    if value is None:
        return ""
    text = str(value)
    return "" if text in ("", ".") else text


def validateSettings(config: dict):
    """Refuse, before any slow step, settings that the worker would reject only after encoding."""
    refine = config.get("refine", "box")
    if config.get("backbone") == "dinov2" and refine != "none" and not config.get("sam_checkpoint"):
        raise ValueError(f"refinement '{refine}' uses LiteMedSAM, which needs the LiteMedSAM backbone: with "
                         "DINOv2 choose refinement 'none' or give a segment-anything SAM checkpoint")
