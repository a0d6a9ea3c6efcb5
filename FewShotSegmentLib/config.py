"""Every setting of a few-shot run in one dataclass, so jobs, the CLI, saved adapters and the Slicer
parameter node all speak the same names."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import InputError

ADAPTERS = ("basic", "classification", "contrastive")
AXES = ("axial", "coronal", "sagittal")
REFINEMENTS = ("none", "box", "points")
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class PipelineConfig:
    # backbone: "litemedsam" (offline default), "dinov2" (timm hub name in backbone_name or a
    # local file in checkpoint), or "checkpoint" (a user file for the LiteMedSAM/DINOv2 architecture)
    backbone: str = "litemedsam"
    backbone_name: str = "vit_small_patch14_dinov2"
    checkpoint: str = ""
    # LiteMedSAM: "preneck" (320 ch, localizes better) or "neck" (256 ch, the SAM embedding)
    feature_layer: str = "preneck"
    # intensity: "auto" (CT if the range looks like HU, else MRI), "ct", "mri"
    modality: str = "auto"
    # CT window name ("abdomen", "soft_tissue", "lung", "bone", "brain", "liver") or "center,width"
    ct_window: str = "abdomen"
    adapter: str = "contrastive"
    center_features: bool = False     # basic adapter: subtract the volume mean feature first
    threshold: float = 0.5            # basic adapter cosine threshold / contrastive min probability
    axis: str = "axial"
    refine: str = "box"
    n_points: int = 10                # refine="points": random positive points per component
    sam_checkpoint: str = ""          # refine with segment-anything SAM ViT instead of LiteMedSAM
    keep_components: int = 0          # 0: per label default (2 for kidney/lung-like names, else 1)
    min_component_voxels: int = 20
    landmarks: bool = True
    device: str = "auto"
    seed: int = 0
    epochs: int = 60                  # classification adapter: passes over the training pixels
    steps: int = 1500                 # contrastive adapter: pair batches
    negative_margin_px: int = 0       # >0: background pixels this close to a RoI are not negatives
    samples_per_label: int = 2000     # training pixels per label per template slice
    batch_size: int = 4               # slices per encoder batch
    cache_dir: str = ""               # feature cache; "" disables

    def validate(self) -> "PipelineConfig":
        for name, allowed in (("adapter", ADAPTERS), ("axis", AXES), ("refine", REFINEMENTS),
                              ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.feature_layer not in ("preneck", "neck"):
            raise InputError(f"feature_layer must be 'preneck' or 'neck', got {self.feature_layer!r}")
        if self.modality not in ("auto", "ct", "mri"):
            raise InputError(f"modality must be 'auto', 'ct' or 'mri', got {self.modality!r}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {self.threshold}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "PipelineConfig":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**values).validate()
