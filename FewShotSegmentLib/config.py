"""Every setting of a few-shot run in one dataclass, so jobs, the CLI, saved adapters and the Slicer
parameter node all speak the same names."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import InputError

ADAPTERS = ("basic", "classification", "contrastive")
# "auto": the axis the template is painted along (the one on which it covers the fewest slices);
# without a template, the adapter's; "stack": the volume's own slice (acquisition) axis, which is
# what an oblique MRI stack (cardiac short axis, knee, shoulder) is painted in.
ANATOMICAL_AXES = ("axial", "coronal", "sagittal")
AXES = ("auto", "stack") + ANATOMICAL_AXES
REFINEMENTS = ("none", "box", "points")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")
LOCATIONS = ("auto", "off", "inplane", "3d")
FEATURE_LAYERS = ("preneck", "neck", "stages")     # LiteMedSAM's (backbones.LiteMedSAMBackbone)
FEATURE_LAYER_CHOICES = ("auto",) + FEATURE_LAYERS  # "auto": resolve_feature_layer


@dataclass
class PipelineConfig:
    # backbone: "litemedsam" (offline default), "dinov2" (timm hub name in backbone_name or a
    # local file in checkpoint), or "checkpoint" (a user file for the LiteMedSAM/DINOv2 architecture)
    backbone: str = "litemedsam"
    backbone_name: str = "vit_small_patch14_dinov2"
    checkpoint: str = ""
    # LiteMedSAM: "preneck" (320 ch, localizes better), "neck" (256 ch, the SAM embedding),
    # "stages" (the first 64x64 stage's 160 channels beside the pre-neck's: finer, more local
    # detail) or "auto": "stages" for an adapter trained to label other volumes (the "train" task;
    # across patients 0.833 -> 0.853 within range, benchmarks/results/cross_patient.md), "preneck"
    # for one that labels its painted volume (resolve_feature_layer)
    feature_layer: str = "auto"
    # intensity: "auto" (CT if the range looks like HU, else MRI), "ct", "mri"
    modality: str = "auto"
    # CT window name ("abdomen", "soft_tissue", "lung", "bone", "brain", "liver") or "center,width"
    ct_window: str = "abdomen"
    adapter: str = "contrastive"
    center_features: bool = False     # basic adapter: subtract the volume mean feature first
    threshold: float = 0.5            # basic adapter cosine threshold / contrastive min probability
    axis: str = "auto"
    refine: str = "box"
    n_points: int = 10                # refine="points": random positive points per component
    sam_checkpoint: str = ""          # refine with segment-anything SAM ViT instead of LiteMedSAM
    keep_components: int = 0          # 0: per label default (2 for kidney/lung-like names, else 1)
    min_component_voxels: int = 20
    # on the painted volume, beyond a label's outermost painted slice: a label that has narrowed
    # and widens again is cut at the neck (postprocess.cut_regrowth)
    cut_regrowth: bool = True
    landmarks: bool = True
    device: str = "auto"
    # encoder arithmetic: "auto" (bf16 on CPUs with AMX/AVX512-BF16 and on CUDA GPUs that have it,
    # fp32 elsewhere), "fp32", "bf16"; compiled ahead of time (acceleration.py, a package per machine in
    # the per-user cache): "auto" (when a C++ compiler is there), "on", "off"
    precision: str = "auto"
    compile: str = "auto"
    seed: int = 0
    epochs: int = 60                  # classification adapter: passes over the training pixels
    steps: int = 1500                 # contrastive adapter: pair batches (at most)
    # ...stopping earlier once the mean loss of this many steps has not fallen by 5 % for two such
    # windows in a row (0: always run all steps)
    plateau_steps: int = 100
    # adapter training with bf16 matmuls on CPUs with AMX / AVX512-BF16 (fp32 elsewhere; weights
    # and optimizer stay float32): a contrastive step 5.4-7.8 ms instead of 15.5 (AMD EPYC, one
    # thread). It trains a different adapter: one slice per organ (benchmarks/one_volume.py), CHAOS
    # mean Dice 0.905 -> 0.905, demo CT 0.872 -> 0.905 (spleen 0.73 -> 0.86), every organ within
    # 0.02 otherwise; across patients (benchmarks/results/cross_patient.md, one support patient,
    # location off) 0.809 -> 0.805 within range, within what a seed moves
    train_bf16: bool = True
    # propagation scores pixels on a grid of this many feature cells and interpolates between them
    score_stride_cells: float = 0.5
    # ...coarse to fine: exactly only near class boundaries and doubt, interpolated elsewhere
    # (propagation.adaptive_scores: 2.5x less adapter work; False scores every grid point)
    adaptive_scoring: bool = True
    # on a painted volume whose labels are all known single organs, score only the slices that a
    # component touching the painting can reach (propagation.reachable_slices: the result is the
    # same as scoring every slice; the rest is background without doubt in uncertainty.nrrd)
    reachable_only: bool = True
    negative_margin_px: int = 0       # >0: background pixels this close to a RoI are not negatives
    # ...and never closer than this fraction of the stroke's equivalent radius: the rim just outside
    # an under-painted organ is organ, so it must not be taught as background
    negative_margin_fraction: float = 0.15
    # adapter probabilities are averaged with the neighbouring slices' (Gaussian weights, sigma in
    # mm) before each pixel's decision, so the result is consistent across slices; 0 disables
    smooth_across_mm: float = 3.0
    # final labels are smoothed in 3D (Gaussian of each label's mask, sigma in mm, then the most
    # covered label wins, as Slicer's joint smoothing); 0 disables
    smooth_final_mm: float = 0.0
    # a label is refined only if SAM, prompted on the painted slices, reproduces the painting with
    # at least this Dice (a ring or a nested structure is not: SAM fills it)
    refine_min_dice: float = 0.75
    # where a pixel lies in the body (location.py) as adapter input: "off", "inplane" (right-left
    # and anterior-posterior relative to the body outline), "3d" (and along the scan), or "auto":
    # "inplane" for an adapter trained to label other volumes (the "train" task), "off" for one
    # that labels the volume it was painted on (the "run" task; resolve_location): there the
    # painting anchors every label, and "inplane" moved organs by up to 0.05 either way on a
    # volume painted on one slice per organ. Across patients see benchmarks/results/cross_patient.md
    location: str = "auto"
    # on a volume without painting (another patient), the label scores are weighted by how near
    # each pixel lies to where the template had the label (propagation.LocationPrior; the exponent of
    # that weight; 0 disables)
    location_prior: float = 1.0
    # on a volume without painting: after a first choice of components, each label's expected
    # in-plane place is taken again from where the other labels were found and the template's
    # offsets between them (pipeline.relative_place), not from the body outline alone
    relative_place: bool = True
    # on a volume without painting (another patient): a second pass in which this fraction of each
    # label's reference pixels (contrastive) or prototype (basic) comes from the pixels the first
    # pass was surest of on that volume (self-support; pipeline.target_support); 0 disables
    self_support: float = 0.0
    # adapters (seeds seed, seed+1, ..., each on its own draw of training pixels) whose scores are
    # averaged (adapters/ensemble.py); 0, "auto": 3 for an adapter trained to label other volumes
    # (the "train" task), 1 for one that labels its painted volume (resolve_ensemble). Across
    # patients (benchmarks/results/cross_patient.md, one support patient) one adapter gave 0.828
    # within range / 0.796 whole volume with seed 0 and 0.835 / 0.795 with seed 1, three 0.835 / 0.805
    ensemble: int = 0
    samples_per_label: int = 2000     # training pixels per label per template slice
    batch_size: int = 4               # slices per encoder batch
    # a painted volume's slices are encoded when propagation first reads them (features.py):
    # the slices no painted label reaches are never encoded; another volume is encoded whole
    encode_on_demand: bool = True
    # every how many slices the encoder runs (features.encoding_step; the others read their
    # neighbours' features interpolated): 0 auto, by the slice spacing against the feature
    # grid's cell (a 512x512 CT of 1.1 mm slices: every 2nd slice; 2.5 mm and more: every slice)
    encode_step: int = 0
    cache_dir: str = ""               # feature cache; "" disables

    def validate(self) -> "PipelineConfig":
        for name, allowed in (("adapter", ADAPTERS), ("axis", AXES), ("refine", REFINEMENTS),
                              ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile not in COMPILE_MODES:
            raise InputError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if isinstance(self.encode_step, bool) or not isinstance(self.encode_step, int) or self.encode_step < 0:
            raise InputError(f"encode_step must be 0 (auto) or a number of slices, got {self.encode_step!r}")
        if self.location not in LOCATIONS:
            raise InputError(f"location must be one of {LOCATIONS}, got {self.location!r}")
        if self.feature_layer not in FEATURE_LAYER_CHOICES:
            raise InputError(f"feature_layer must be one of {FEATURE_LAYER_CHOICES}, got {self.feature_layer!r}")
        if self.modality not in ("auto", "ct", "mri"):
            raise InputError(f"modality must be 'auto', 'ct' or 'mri', got {self.modality!r}")
        if not 0.0 <= self.self_support <= 1.0:
            raise InputError(f"self_support must be in [0, 1], got {self.self_support}")
        if self.ensemble < 0:
            raise InputError(f"ensemble must be 0 (auto) or a number of adapters, got {self.ensemble}")
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


def resolve_location(location: str, for_other_volumes: bool) -> str:
    """The location mode an adapter is trained with: "auto" becomes "inplane" when the adapter
    will label volumes nobody painted (other patients), "off" when it labels its painted volume."""
    if location != "auto":
        return location
    return "inplane" if for_other_volumes else "off"


def resolve_feature_layer(layer: str, for_other_volumes: bool) -> str:
    """The LiteMedSAM features a training reads: "auto" becomes "stages" when the adapter will
    label volumes nobody painted, "preneck" when it labels its painted volume (there the painting
    anchors every label, and 320 channels keep the loop's features a third smaller)."""
    if layer != "auto":
        return layer
    return "stages" if for_other_volumes else "preneck"


# adapters averaged in an adapter trained to label other volumes (config.ensemble 0, "auto")
ENSEMBLE_FOR_OTHER_VOLUMES = 3


def resolve_ensemble(ensemble: int, for_other_volumes: bool) -> int:
    """How many adapters a model averages: 0 ("auto") becomes ENSEMBLE_FOR_OTHER_VOLUMES for an
    adapter that will label volumes nobody painted, 1 for one that labels its painted volume
    (there the painting anchors the result, and the loop's speed matters)."""
    if ensemble:
        return ensemble
    return ENSEMBLE_FOR_OTHER_VOLUMES if for_other_volumes else 1
