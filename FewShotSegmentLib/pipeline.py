"""The whole few-shot method on SimpleITK images: encode -> train adapter on template slices ->
score every slice -> 3D component clean-up -> SAM refinement -> label map + landmarks.

Volumes are processed in a canonical LPS orientation chosen from their physical direction
(never from array order), so "axial" means the same thing for every file; results are mapped
back onto the input image's own grid.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from . import __version__
from .adapters import Adapter, EnsembleAdapter, adapter_from_state, create_adapter, sample_training_pixels
from .acceleration import resolve_precision
from .adapters.base import TrainingPixels
from .backbones import Backbone, build_backbone, pick_device
from .config import ANATOMICAL_AXES, PipelineConfig, resolve_ensemble, resolve_feature_layer, resolve_location
from .errors import CheckpointError, InputError
from .features import AXIS_INDEX, VolumeFeatures, encode_volume, encoding_step, slices_along, volume_from_slices
from .guidance import label_reach, suggest_slices
from .landmarks import LANDMARK_AREA_MM2, landmarks_from_label_map, match_point
from .location import BodyFrame, LocatedFeatures, slice_to_volume
from .postprocess import (AXIAL_MIN_SLICES, AXIAL_VARIATION_MM, axial_centre, centre_bounds, choose_components,
                          clean_label_map, cut_regrowth, default_keep, is_known_organ, strong_components,
                          values_present)
from .preprocessing import guess_modality, normalize_volume
from .propagation import score_volume
from .refine import refinement_agreement, refine_label_slices
from .runtime import encoder_memory

MODEL_FORMAT = "fewshotsegment-adapter"
CANONICAL = "LPS"
PALETTE = [(0.85, 0.40, 0.30), (0.30, 0.65, 0.85), (0.95, 0.80, 0.25), (0.45, 0.80, 0.40),
           (0.70, 0.45, 0.85), (0.95, 0.55, 0.70), (0.40, 0.85, 0.80), (0.80, 0.60, 0.35)]

Progress = Callable[[float, str, str], None]


def _noop(fraction, stage, message):
    pass


@dataclass
class Prediction:
    labels: sitk.Image                    # label values as in the template, on the input grid
    landmarks: list[dict]
    summary: dict = field(default_factory=dict)
    # with segment(..., keep_stages=True): label images after each step ("adapter", "components",
    # "refined"), for benchmarks that report what each step adds
    stages: dict[str, sitk.Image] = field(default_factory=dict)
    # 0..255 per voxel (guidance.py; 0 on painted slices), and the slices worth painting next
    uncertainty: sitk.Image | None = None
    suggestions: list[dict] = field(default_factory=list)


@dataclass
class TrainedModel:
    adapter: Adapter
    config: PipelineConfig
    label_values: list[int]               # adapter class k (1-based) -> label value
    labels: dict[int, dict]               # label value -> {"name", "color"}
    backbone_id: str
    # label value -> [mean u, mean v, spread u, spread v]: where the template had each label,
    # relative to the body (location.py); the component choice on other volumes checks it
    locations: dict[int, list[float]] = field(default_factory=dict)
    modality: str = ""                    # "ct" / "mri" of the training volume(s)
    # label value -> median cross-section (mm^2) on the painted slices: a component far smaller
    # than that on another volume is not the organ
    areas_mm2: dict[int, float] = field(default_factory=dict)
    # label value -> mean unit encoder feature of its painted pixels, for labels painted as
    # landmarks (no larger than landmarks.LANDMARK_AREA_MM2): found on other volumes by matching
    descriptors: dict[int, list[float]] = field(default_factory=dict)
    # label value -> {other label value: mm from the other's centre to this one's along the
    # propagation axis}, for labels painted on enough slices to place their centre (postprocess.
    # axial_centre): on other volumes a component is checked against where the others were found
    axial_offsets_mm: dict[int, dict[int, float]] = field(default_factory=dict)
    # label value -> a low estimate of the organ's volume (mm^3): its median painted cross-section
    # times the span of its painted slices, for labels painted on enough slices to have a span
    # (postprocess.AXIAL_MIN_SLICES): on other volumes a fragment far smaller is not the organ
    volumes_mm3: dict[int, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    encode_seconds: float = 0.0      # painted slices encoded on demand while training

    def __post_init__(self):
        # train_many resolves location "auto"; an adapter put together otherwise was given no
        # location channels, so its features are the encoder's alone
        if self.config.location == "auto":
            self.config = dataclasses.replace(self.config, location="off")
        if self.config.ensemble == 0:         # likewise: the adapter says how many it averages
            self.config = dataclasses.replace(self.config, ensemble=len(getattr(self.adapter, "members", [0])))

    def save(self, path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite to replace it")
        payload = {
            "format": MODEL_FORMAT, "version": 1, "library_version": __version__,
            "config": self.config.to_dict(), "label_values": list(self.label_values),
            "labels": {str(v): {"name": str(s["name"]), "color": [float(c) for c in s["color"]],
                                **({"terminology": str(s["terminology"])} if s.get("terminology") else {})}
                       for v, s in self.labels.items()},
            "backbone_id": self.backbone_id, "adapter": self.adapter.state(),
            "locations": {str(v): [float(x) for x in loc] for v, loc in self.locations.items()},
            "modality": self.modality,
            "areas_mm2": {str(v): float(a) for v, a in self.areas_mm2.items()},
            "descriptors": {str(v): [float(x) for x in d] for v, d in self.descriptors.items()},
            "axial_offsets_mm": {str(v): {str(a): float(mm) for a, mm in row.items()}
                                 for v, row in self.axial_offsets_mm.items()},
            "volumes_mm3": {str(v): float(mm3) for v, mm3 in self.volumes_mm3.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "TrainedModel":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"adapter file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"adapter file {path} is corrupt or not a weights-only torch file: {exc}") from None
        if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{path} is not a FewShotSegment adapter file")
        try:
            return cls(adapter=adapter_from_state(payload["adapter"]),
                       config=PipelineConfig.from_dict(payload["config"]),
                       label_values=[int(v) for v in payload["label_values"]],
                       labels={int(v): dict(s) for v, s in payload["labels"].items()},
                       backbone_id=str(payload["backbone_id"]),
                       locations={int(v): [float(x) for x in loc]
                                  for v, loc in (payload.get("locations") or {}).items()},
                       modality=str(payload.get("modality", "")),
                       areas_mm2={int(v): float(a) for v, a in (payload.get("areas_mm2") or {}).items()},
                       descriptors={int(v): [float(x) for x in d]
                                    for v, d in (payload.get("descriptors") or {}).items()},
                       axial_offsets_mm={int(v): {int(a): float(mm) for a, mm in row.items()}
                                         for v, row in (payload.get("axial_offsets_mm") or {}).items()},
                       volumes_mm3={int(v): float(mm3) for v, mm3 in (payload.get("volumes_mm3") or {}).items()})
        except (KeyError, TypeError, RuntimeError, InputError) as exc:
            raise CheckpointError(f"adapter file {path} is incomplete or from another version: {exc}") from None


@dataclass
class PreparedVolume:
    """An image in canonical orientation, normalized, sliced along the config's axis and encoded."""
    image: sitk.Image
    slices01: np.ndarray                  # (N, H, W) view of the canonical normalized volume
    features: VolumeFeatures
    axis: str
    seconds: float
    modality: str = ""                    # "ct" / "mri", as normalized
    _body: BodyFrame | None = field(default=None, repr=False)
    _canonical: tuple[sitk.Image, tuple[int, int, int]] | None = field(default=None, repr=False)

    @property
    def body(self) -> BodyFrame:
        """The patient's body outline per axial slice (location.py), found once per volume."""
        if self._body is None:
            self._body = BodyFrame.from_volume(volume_from_slices(self.slices01, self.axis))
        return self._body

    def adapter_features(self, location: str):
        """What the adapters see: the encoder's features, with location channels when asked."""
        return self.features if location == "off" else LocatedFeatures(self.features, self.body, self.axis, location)

    def body_position(self, zyx: np.ndarray) -> np.ndarray:
        """(n, 3) canonical (z, y, x) voxels -> (n, 2) body-relative (u, v)."""
        return self.body.coordinates(np.asarray(zyx, np.float64))[:, :2]

    def _canonical_geometry(self) -> tuple[sitk.Image, tuple[int, int, int]]:
        """The canonical volume's geometry, found once by reorienting a uint8 image of the
        image's grid: reorienting the image itself on every call cost a copy of it each time
        (300 MB for a 512x512x300 CT)."""
        if self._canonical is None:
            probe = sitk.Image(self.image.GetSize(), sitk.sitkUInt8)
            probe.CopyInformation(self.image)
            canonical = _to_canonical(probe)
            grid = sitk.Image([1, 1, 1], sitk.sitkUInt8)
            grid.SetOrigin(canonical.GetOrigin())
            grid.SetSpacing(canonical.GetSpacing())
            grid.SetDirection(canonical.GetDirection())
            self._canonical = grid, tuple(canonical.GetSize()[::-1])
        return self._canonical

    @property
    def canonical_grid(self) -> sitk.Image:
        """A one-voxel image with the canonical volume's origin, spacing and direction."""
        return self._canonical_geometry()[0]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape of the canonical volume."""
        return self._canonical_geometry()[1]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size (mm) of the canonical volume's (z, y, x) array axes."""
        return tuple(self.canonical_grid.GetSpacing()[::-1])

    @property
    def pixel_area_mm2(self) -> float:
        """Area of one pixel of a slice along the propagation axis."""
        spacing = list(self.spacing_zyx)
        spacing.pop(AXIS_INDEX[self.axis])
        return float(spacing[0] * spacing[1])

    @property
    def slice_spacing_mm(self) -> float:
        """Distance between neighbouring slices along the propagation axis."""
        return float(self.spacing_zyx[AXIS_INDEX[self.axis]])

    def to_slices(self, image_like: sitk.Image) -> np.ndarray:
        """A label image on the input grid -> (N, H, W) array aligned with slices01."""
        return slices_along(sitk.GetArrayFromImage(_to_canonical(image_like)), self.axis)

    def from_slices(self, stack: np.ndarray, dtype=np.uint16) -> sitk.Image:
        volume = volume_from_slices(stack, self.axis)
        canonical = sitk.GetImageFromArray(np.ascontiguousarray(volume).astype(dtype, copy=False))
        grid = self.canonical_grid
        canonical.SetOrigin(grid.GetOrigin())
        canonical.SetSpacing(grid.GetSpacing())
        canonical.SetDirection(grid.GetDirection())
        original = sitk.DICOMOrient(canonical, _orientation(self.image))
        original.CopyInformation(self.image)  # same grid; drop floating-point noise of the reorient
        return original


def _orientation(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _to_canonical(image: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(image, CANONICAL)


def stack_axis(image: sitk.Image) -> str:
    """The anatomical name of the canonical axis that the image's own slice axis (its third index
    axis, the acquisition stack) becomes: the plane a clinician scrolls through and paints in."""
    direction = np.array(image.GetDirection()).reshape(3, 3)   # columns: index axes i, j, k in LPS
    world = int(np.argmax(np.abs(direction[:, 2])))             # 0 L-R, 1 P-A, 2 S-I
    return ("sagittal", "coronal", "axial")[world]


def resolve_axis(axis: str, image: sitk.Image, template: sitk.Image | None = None) -> str:
    """'axial' / 'coronal' / 'sagittal' for a configured axis. 'auto' is the axis the template is
    painted along (it covers the fewest slices along it; ties go to the stack axis), or the stack
    axis without a template; 'stack' is always the stack axis."""
    if axis in ANATOMICAL_AXES:
        return axis
    stack = stack_axis(image)
    if axis == "stack" or template is None:
        return stack
    canonical = _to_canonical(template)   # a view must not outlive its image (it segfaulted on 512x512x300)
    painted = sitk.GetArrayViewFromImage(canonical) != 0
    counts = {name: int(painted.any(axis=tuple(a for a in range(3) if a != AXIS_INDEX[name])).sum())
              for name in ANATOMICAL_AXES}
    fewest = min(counts.values())
    return next(name for name in (stack,) + ANATOMICAL_AXES if counts[name] == fewest)


def resolved(config: PipelineConfig, image: sitk.Image, template: sitk.Image | None = None,
             for_other_volumes: bool = False) -> PipelineConfig:
    """A copy of ``config`` whose axis is an anatomical one (see resolve_axis) and whose location
    mode, ensemble size and feature layer are not "auto" (config.resolve_location,
    resolve_ensemble, resolve_feature_layer): the settings a training depends on."""
    return _training_config(config, resolve_axis(config.axis, image, template), for_other_volumes)


def _training_config(config: PipelineConfig, axis: str, for_other_volumes: bool) -> PipelineConfig:
    """``config`` along ``axis``, with the "auto" settings a training depends on resolved."""
    return PipelineConfig.from_dict({**config.to_dict(), "axis": axis,
                                     "feature_layer": resolve_feature_layer(config.feature_layer, for_other_volumes),
                                     "location": resolve_location(config.location, for_other_volumes),
                                     "ensemble": resolve_ensemble(config.ensemble, for_other_volumes)})


def check_image(image: sitk.Image) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"need a 3D scalar image, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components")
    if min(image.GetSize()) < 1 or sorted(image.GetSize())[1] < 8:
        raise InputError(f"image of size {image.GetSize()} is too small to segment")


def build_backbone_for(config: PipelineConfig) -> Backbone:
    return build_backbone(config.backbone, name=config.backbone_name, checkpoint=config.checkpoint,
                          layer=resolve_feature_layer(config.feature_layer, False), device=config.device,
                          precision=config.precision,
                          compile=config.compile)


def prepare_volume(image: sitk.Image, config: PipelineConfig, backbone: Backbone, progress: Progress = _noop,
                   cancel: Callable[[], bool] | None = None, progress_range=(0.0, 0.55),
                   on_demand: bool = False) -> PreparedVolume:
    """``config.axis`` 'auto' without a template means the stack axis: resolve it first (see
    ``resolved``) when a template decides. ``on_demand``: slices are encoded when first read
    (features.encode_volume)."""
    check_image(image)
    start = time.perf_counter()
    axis = resolve_axis(config.axis, image)
    canonical = _to_canonical(image)
    spacing_zyx = canonical.GetSpacing()[::-1]
    raw = sitk.GetArrayViewFromImage(canonical)     # normalize_volume makes the one copy
    modality = guess_modality(raw) if config.modality == "auto" else config.modality
    volume = normalize_volume(raw, modality, config.ct_window)
    del raw, canonical                               # the view dies before its image
    slices = slices_along(volume, axis)
    features = encode_volume(slices, backbone, batch_size=config.batch_size, cache_dir=config.cache_dir,
                             progress=progress, cancel=cancel, progress_range=progress_range, on_demand=on_demand,
                             step=_encoding_step(config, backbone, spacing_zyx, axis, slices.shape[1:]))
    return PreparedVolume(image, slices, features, axis, time.perf_counter() - start, modality)


def _encoding_step(config: PipelineConfig, backbone: Backbone, spacing_zyx, axis: str,
                   slice_shape: tuple[int, int]) -> int:
    """config.encode_step, or (0) the step the slice spacing allows (features.encoding_step), from
    the finer in-plane pixel size (a feature cell's smallest extent in mm)."""
    spacing = [float(v) for v in spacing_zyx]
    slice_mm = spacing.pop(AXIS_INDEX[axis])
    # a backbone that names no cell (cell_pixels 0) keeps every slice
    return encoding_step(backbone.cell_pixels(slice_shape) * min(spacing), slice_mm, config.encode_step)


def template_labels(template: sitk.Image, image: sitk.Image, labels: dict | None) -> tuple[list[int], dict[int, dict]]:
    """Label values to learn (those painted, restricted to ``labels`` when given) and their metadata."""
    if template.GetSize() != image.GetSize():
        raise InputError(f"template size {template.GetSize()} != image size {image.GetSize()}")
    values = values_present(sitk.GetArrayViewFromImage(template))
    painted = [int(v) for v in values if v != 0]
    if not painted:
        raise InputError("template has no labelled voxels: paint at least one label on one slice")
    labels = {int(k): dict(v) for k, v in (labels or {}).items()}
    if labels:
        missing = sorted(set(labels) - set(painted))
        if missing:
            names = [labels[v].get("name", v) for v in missing]
            raise InputError(f"label(s) {names} (value {missing}) are not painted in the template")
        painted = [v for v in painted if v in labels]
    meta = {}
    for i, value in enumerate(painted):
        spec = labels.get(value, {})
        meta[value] = {"name": str(spec.get("name") or f"label_{value}"),
                       "color": [float(c) for c in spec.get("color") or PALETTE[i % len(PALETTE)]]}
        if spec.get("terminology"):
            meta[value]["terminology"] = str(spec["terminology"])
    return painted, meta


def train(prepared: PreparedVolume, template: sitk.Image, config: PipelineConfig, labels: dict | None = None,
          backbone_id: str = "", progress: Progress = _noop,
          cancel: Callable[[], bool] | None = None, warm_start: TrainedModel | None = None,
          for_other_volumes: bool = False) -> TrainedModel:
    """Train the configured adapter on the template's painted slices of ``prepared``.
    ``warm_start``: a model trained earlier on this volume (same adapter kind and labels) whose
    weights the training starts from; ignored when it does not fit. ``for_other_volumes``: the
    adapter is for volumes without painting (other patients; see config.resolve_location)."""
    return train_many([(prepared, template, labels)], config, backbone_id, progress, cancel, warm_start,
                      for_other_volumes)


def match_labels(examples: list[tuple[PreparedVolume, sitk.Image, dict | None]]) -> list[tuple[list[int], dict]]:
    """Label values and metadata of each template, the templates matched by segment name: every
    template must paint the same names (values may differ between files). The first template's
    values and order are the model's."""
    matched = []
    first_names = None
    for number, (prepared, template, labels) in enumerate(examples, start=1):
        values, meta = template_labels(template, prepared.image, labels)
        names = [meta[v]["name"] for v in values]
        if len(set(names)) != len(names):
            raise InputError(f"template {number} gives two labels the same name: {names}")
        if first_names is None:
            first_names = names
        elif set(names) != set(first_names):
            raise InputError(f"template {number} paints labels {sorted(names)} but template 1 paints "
                             f"{sorted(first_names)}: every template must paint the same segment names")
        by_name = {meta[v]["name"]: v for v in values}
        matched.append(([by_name[name] for name in first_names], meta))
    return matched


def train_many(examples: list[tuple[PreparedVolume, sitk.Image, dict | None]], config: PipelineConfig,
               backbone_id: str = "", progress: Progress = _noop, cancel: Callable[[], bool] | None = None,
               warm_start: TrainedModel | None = None, for_other_volumes: bool = False) -> TrainedModel:
    """One adapter from the painted slices of one or several volumes: ``examples`` are
    (prepared volume, template on its grid, labels or None). Labels are matched by name
    (match_labels); every volume contributes as many training pixels of each label (the smallest
    volume's count), so a volume painted on more slices does not outweigh the others.
    ``for_other_volumes``: the adapter will label volumes nobody painted, which decides
    location="auto" (config.resolve_location); the model keeps the resolved mode."""
    if not examples:
        raise InputError("no template given")
    axes = {prepared.axis for prepared, _, _ in examples}
    if len(axes) > 1:
        raise InputError(f"the templates are painted along different axes {sorted(axes)}")
    modalities = {prepared.modality for prepared, _, _ in examples}
    if len(modalities) > 1:
        raise InputError(f"the template volumes mix modalities {sorted(modalities)}: train one adapter per modality")
    matched = match_labels(examples)
    config = _training_config(config, examples[0][0].axis, for_other_volumes)
    rng = np.random.default_rng(config.seed)
    # each further adapter of an ensemble learns from its own draw of training pixels: which pixels
    # are drawn moves an organ across patients more than the adapter's own seed does
    member_rngs = [np.random.default_rng([config.seed, i]) for i in range(1, config.ensemble)]
    member_volumes = [[] for _ in member_rngs]
    per_volume, positions, areas, index_maps, centres, spans = [], {}, {}, [], [], []
    for (prepared, template, _), (values, _) in zip(examples, matched):
        index_map = _to_index(prepared.to_slices(template), values)
        index_maps.append(index_map)
        template_slices = [i for i in range(len(index_map)) if index_map[i].any()]
        present = set(np.unique(index_map[template_slices]).tolist()) - {0}
        if len(present) < len(values):
            raise InputError("a label has no template pixels along the chosen axis")
        prepared.features.keep_exact(template_slices)       # training reads their pixels
        features = prepared.adapter_features(config.location)
        for draws, draw_rng in zip([per_volume, *member_volumes], [rng, *member_rngs]):
            draws.append(sample_training_pixels(features, index_map, template_slices, config.samples_per_label,
                                                config.negative_margin_px, draw_rng, config.negative_margin_fraction))
        pixel_mm2, spacing = prepared.pixel_area_mm2, prepared.slice_spacing_mm
        centre, span = {}, {}
        for k in range(1, len(values) + 1):
            positions.setdefault(k, []).append(_label_positions(prepared, index_map, template_slices, k, rng))
            counts = (index_map[template_slices] == k).reshape(len(template_slices), -1).sum(1)
            areas.setdefault(k, []).extend((counts[counts > 0] * pixel_mm2).tolist())
            # painted across an organ (the protocol's 1/6, 1/2, 5/6), its slices tell where the organ
            # lies (mm along the propagation axis) and how far it reaches; one painted slice says neither
            on = np.asarray(template_slices)[counts > 0]
            if len(on) >= AXIAL_MIN_SLICES:
                centre[k] = axial_centre(on.min(), on.max()) * spacing
                span[k] = float(on.max() - on.min()) * spacing
        centres.append(centre)
        spans.append(span)
    # each draw is dropped once balanced: all draws of 4 volumes for 3 members are ~3 GB
    pixels = balance_pixels(per_volume, rng)
    per_volume = None
    if member_rngs:
        pixels = [pixels]
        for i, draw_rng in enumerate(member_rngs):
            pixels.append(balance_pixels(member_volumes[i], draw_rng))
            member_volumes[i] = None
    values, meta = matched[0]
    options = {"basic": dict(threshold=config.threshold, center_features=config.center_features),
               "classification": dict(epochs=config.epochs),
               "contrastive": dict(steps=config.steps, threshold=config.threshold,
                                   plateau_steps=config.plateau_steps)}[config.adapter]
    def make(seed):
        return create_adapter(config.adapter, seed=seed, **options)

    adapter = make(config.seed) if config.ensemble == 1 else EnsembleAdapter.of(make, config.ensemble, config.seed)
    if warm_start is not None and warm_start.label_values == values:
        adapter.warm_start(warm_start.adapter)
    torch.manual_seed(config.seed)
    bf16 = config.train_bf16 and resolve_precision("auto", torch.device("cpu")) == "bf16"
    adapter.fit(pixels, progress=lambda f, m: progress(f, "train", m), cancel=cancel, bf16=bf16)
    locations = {}
    for k, value in enumerate(values, start=1):
        uv = np.concatenate(positions[k])
        locations[value] = [*uv.mean(0).tolist(), *uv.std(0).tolist()]
    areas_mm2 = {value: float(np.median(areas[k])) for k, value in enumerate(values, start=1)}
    descriptors = {}
    for k, value in enumerate(values, start=1):
        if areas_mm2[value] <= LANDMARK_AREA_MM2:
            per_volume = [_label_descriptor(prepared, index_map, k)
                          for (prepared, _, _), index_map in zip(examples, index_maps)]
            descriptors[value] = torch.stack(per_volume).mean(0).tolist()
    offsets = {}
    for k, value in enumerate(values, start=1):
        row = {values[a - 1]: float(np.mean([c[k] - c[a] for c in centres if k in c and a in c]))
               for a in range(1, len(values) + 1) if a != k and any(k in c and a in c for c in centres)}
        if row:
            offsets[value] = row
    volumes = {value: areas_mm2[value] * float(np.mean([s[k] for s in spans if k in s]))
               for k, value in enumerate(values, start=1) if any(k in s for s in spans)}
    return TrainedModel(adapter, config, values, meta, backbone_id, locations, examples[0][0].modality, areas_mm2,
                        descriptors, offsets, volumes)


def _label_descriptor(prepared: PreparedVolume, index_map: np.ndarray, k: int) -> torch.Tensor:
    """(C,) mean unit encoder feature over the painted pixels of label k (a landmark's RoI)."""
    units = []
    for i in np.flatnonzero((index_map == k).any(axis=(1, 2))):
        rows, cols = np.nonzero(index_map[i] == k)
        feats = prepared.features.sample(int(i), rows, cols)
        units.append(feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return torch.cat(units).mean(0)


def _label_positions(prepared: PreparedVolume, index_map: np.ndarray, painted: list[int], k: int, rng,
                     count: int = 4000) -> np.ndarray:
    """Body-relative (u, v) of up to ``count`` painted pixels of label k (its place in the body).
    Only the ``painted`` slices are searched (on a 512x512x300 CT the whole stack took 0.9 s a label)."""
    where = np.argwhere(index_map[painted] == k)
    where[:, 0] = np.asarray(painted)[where[:, 0]]
    where = where[rng.choice(len(where), size=min(count, len(where)), replace=False)]
    return prepared.body_position(slice_to_volume(where[:, 0], where[:, 1], where[:, 2], prepared.axis))


def balance_pixels(per_volume: list[TrainingPixels], rng) -> TrainingPixels:
    """Training pixels of several volumes, each volume given the same number of every label's
    (and the background's) pixels: the smallest volume's count."""
    if len(per_volume) == 1:
        return per_volume[0]
    picks = []      # (volume's pixels, the rows taken), in the order they are stacked
    classes = sorted(set().union(*(set(p.labels.unique().tolist()) for p in per_volume)))
    for k in classes:
        pools = [torch.nonzero(p.labels == k).flatten() for p in per_volume]
        n = min(len(pool) for pool in pools if len(pool))      # k is in at least one volume
        for p, pool in zip(per_volume, pools):
            if len(pool) == 0:
                continue
            picks.append((p, pool[torch.from_numpy(rng.choice(len(pool), size=n, replace=False))]))
    # gathered straight into one tensor: no pieces beside it (several volumes' pixels are GBs)
    total = sum(len(rows) for _, rows in picks)
    first = per_volume[0]
    feats = torch.empty((total, first.features.shape[1]), dtype=first.features.dtype)
    labels = torch.empty(total, dtype=first.labels.dtype)
    start = 0
    for p, rows in picks:
        torch.index_select(p.features, 0, rows, out=feats[start:start + len(rows)])
        labels[start:start + len(rows)] = p.labels[rows]
        start += len(rows)
    return TrainingPixels(feats, labels)


def _to_index(stack: np.ndarray, values: list[int]) -> np.ndarray:
    index = np.zeros(stack.shape, np.uint8)
    for k, value in enumerate(values, start=1):
        index[stack == value] = k
    return index


def painted_slices(seeds: np.ndarray | None) -> list[int]:
    return [] if seeds is None else [int(i) for i in np.flatnonzero(seeds.reshape(len(seeds), -1).any(1))]


def _paint(index: np.ndarray, seeds: np.ndarray | None, painted: list[int]) -> np.ndarray:
    """The painting is the truth: painted slices come back exactly as painted (a label left
    unpainted on a painted slice is absent there)."""
    if painted:
        index[painted] = seeds[painted]
    return index


def segment(model: TrainedModel, prepared: PreparedVolume, template: sitk.Image | None = None,
            progress: Progress = _noop, cancel: Callable[[], bool] | None = None,
            keep_stages: bool = False, suggestion_count: int = 5) -> Prediction:
    """Label every slice of ``prepared``; ``template`` (same image) seeds the component clean-up,
    decides which labels SAM may refine, and is copied onto its painted slices. The prediction
    carries the ``suggestion_count`` slices most worth painting next."""
    config = model.config
    if config.axis in ANATOMICAL_AXES and config.axis != prepared.axis:
        raise InputError(f"the adapter propagates along {config.axis} slices, the volume was prepared "
                         f"along {prepared.axis}")
    timings = {"encode_s": prepared.seconds}
    stage = _StageClock(timings, prepared.features)
    stage.start("propagate_s")
    seeds = None if template is None else _to_index(prepared.to_slices(template), model.label_values)
    painted = painted_slices(seeds)
    # the location prior only where nothing is painted: on the painted volume the painting anchors
    # each label (seeded components), and a label painted on one slice gives too narrow a spread
    # (measured on CHAOS P1, one slice per organ: spleen 0.96 -> 0.80 with the prior)
    keep = {k: config.keep_components or default_keep(model.labels[v]["name"])
            for k, v in enumerate(model.label_values, start=1)}
    # scoring only the slices a painted label can reach is exact when the clean-up keeps nothing
    # else: every label a known organ with one part (unknown names keep strong components
    # anywhere, and a label of two parts painted as one takes the largest other component)
    reach = painted and config.reachable_only and all(
        keep[k] == 1 and is_known_organ(model.labels[v]["name"]) for k, v in enumerate(model.label_values, start=1))

    def scored_and_cleaned(model):
        with encoder_memory():     # slices encoded on demand on the way (features.py)
            scored = score_volume(model, prepared, lambda f, s, m: progress(0.6 + 0.2 * f, s, m), cancel,
                                  use_prior=template is None, reach_from=seeds if reach else None)
        stage.stop()
        while True:
            adapter_index = _paint(scored.index.copy(), seeds, painted)
            evidence = {}
            index = _paint(_clean_by_evidence(adapter_index, seeds, keep, scored.confidence, model, prepared,
                                              evidence), seeds, painted)
            if scored.covers(index):
                return scored, adapter_index, index, evidence
            stage.start("propagate_s")
            with encoder_memory():
                scored.score_all()      # a kept component runs onto an unscored slice (it turned back from beyond)
            stage.stop()

    scored, adapter_index, index, evidence = scored_and_cleaned(model)
    if template is None and config.self_support > 0:
        stage.start("propagate_s")
        target = target_support(index, scored.confidence, prepared, model)
        if target:
            scored, adapter_index, index, evidence = scored_and_cleaned(
                dataclasses.replace(model, adapter=model.adapter.supported_by(target, config.self_support)))
        else:
            stage.stop()
    values = np.array([0] + model.label_values, dtype=np.uint16)
    stages = {}
    if keep_stages:
        stages["adapter"] = prepared.from_slices(values[adapter_index])
    if keep_stages:
        stages["components"] = prepared.from_slices(values[index])
    refinement = {}
    if config.refine != "none":
        stage.start("refine_s")
        device = pick_device(config.device)
        refine_values = None
        if painted:
            agreement = refinement_agreement(seeds, painted, prepared.features, prepared.slices01, config.refine,
                                             config.n_points, config.seed, config.sam_checkpoint, device,
                                             config.precision)
            refine_values = [k for k, d in agreement.items() if d >= config.refine_min_dice]
            refinement = {model.labels[model.label_values[k - 1]]["name"]:
                          {"painting_dice": round(d, 4), "refined": d >= config.refine_min_dice}
                          for k, d in sorted(agreement.items())}
        index = refine_label_slices(index, prepared.features, prepared.slices01, config.refine, config.n_points,
                                    config.seed, config.sam_checkpoint, device,
                                    lambda f, m: progress(0.8 + 0.15 * f, "refine", m), cancel,
                                    refine_values=refine_values, skip_slices=painted,
                                    precision=config.precision)
        # a second clean-up: SAM's masks may leave or join pieces. Tried instead: cutting SAM's
        # islands per slice and no second pass; across patients the left kidney lost 0.14 and the
        # liver 0.08 on some pairs (benchmarks/results/cross_patient.json development_variants)
        index = _paint(_clean_by_evidence(index, seeds, keep, scored.confidence, model, prepared), seeds, painted)
        stage.stop()
        if keep_stages:
            stages["refined"] = prepared.from_slices(values[index])
    if config.smooth_final_mm > 0:
        index = _paint(_smooth_labels(index, config.smooth_final_mm, prepared), seeds, painted)
    label_image = prepared.from_slices(values[index])
    stage.start("propagate_s")
    for k in range(1, len(model.label_values) + 1):    # the doubt the suggestions read (label_reach)
        scored.score(range(*label_reach(index, k)[0].indices(len(index))))
    stage.stop()
    uncertainty = scored.uncertainty
    uncertainty[painted] = 0                      # the painting is certain
    painted_per_label = {k: [i for i in painted if (seeds[i] == k).any()] or painted
                         for k in range(1, len(model.label_values) + 1)}
    suggestions = [_describe_slice(s, prepared, model) for s in
                   suggest_slices(uncertainty, scored.runner_up, index, painted_per_label,
                                  suggestion_count)]
    landmarks = landmarks_from_label_map(label_image, model.labels) if config.landmarks else []
    if config.landmarks and template is None and model.descriptors:
        landmarks = _matched_landmarks(landmarks, model, prepared, label_image)
    counts = {model.labels[v]["name"]: int(np.count_nonzero(index == k)) for k, v in enumerate(model.label_values, start=1)}
    missing = [name for name, n in counts.items() if n == 0]
    summary = {"voxels": counts, "not_found": missing, "timings": timings, "axis": prepared.axis,
               "scored_slices": int(scored.scored.sum()), "encoded_slices": int(prepared.features.encoded.sum()),
               "components": evidence,
               "painted_slices": painted, "refinement": refinement, "suggested_slices": suggestions,
               "landmarks": [{"label": p["label"], "position_lps": list(p["position"]),
                              "method": p.get("method", "region")} for p in landmarks]}
    progress(1.0, "done", "segmentation finished" + (f"; not found: {missing}" if missing else ""))
    if keep_stages:
        stages["final"] = label_image
    return Prediction(label_image, landmarks, summary, stages, prepared.from_slices(uncertainty, np.uint8),
                      suggestions)


def target_support(index: np.ndarray, confidence: np.ndarray, prepared: PreparedVolume, model: TrainedModel,
                   count: int = 16) -> dict[int, torch.Tensor]:
    """Adapter-input features of ``count`` pixels per found label of a first pass on another volume,
    drawn from the surer half of its kept component(s) (confidence at least the label's median):
    what the second pass compares with beside the template (config.self_support)."""
    features = prepared.adapter_features(model.config.location)
    rng = np.random.default_rng(model.config.seed)
    target = {}
    for k in range(1, len(model.label_values) + 1):
        where = np.argwhere(index == k)
        if len(where) < count:
            continue
        sure = confidence[tuple(where.T)]
        where = where[sure >= np.median(sure)]
        where = where[np.sort(rng.choice(len(where), size=min(count, len(where)), replace=False))]
        feats = torch.cat([features.sample(int(i), where[where[:, 0] == i, 1], where[where[:, 0] == i, 2])
                           for i in np.unique(where[:, 0])]).float()
        target[k] = feats[torch.from_numpy(rng.permutation(len(feats)))]   # no slice order in the first n
    return target


class _StageClock:
    """Seconds per stage into ``timings``; slices encoded on demand during a stage (features.py)
    count as encoding (``encode_s``), not as the stage that read them."""

    def __init__(self, timings: dict, features: VolumeFeatures):
        self.timings, self.features = timings, features
        self._running = None

    def start(self, name: str) -> None:
        self._running = (name, time.perf_counter(), self.features.encoder_seconds)

    def stop(self) -> None:
        name, started, encoded = self._running
        spent = self.features.encoder_seconds - encoded
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started - spent
        self.timings["encode_s"] += spent
        self._running = None


def _matched_landmarks(landmarks: list[dict], model: TrainedModel, prepared: PreparedVolume,
                       label_image: sitk.Image) -> list[dict]:
    """On another volume, a label painted as a landmark is placed where the volume looks most like
    its painted RoI near where the template had it (landmarks.match_point), not at the centroid
    of what the adapter labelled: a few painted pixels teach an adapter little that transfers."""
    def body_position(srcs):            # (slice, row, col) along the axis -> body-relative (u, v)
        return prepared.body_position(slice_to_volume(srcs[:, 0], srcs[:, 1], srcs[:, 2], prepared.axis))

    by_value = {p["label_value"]: p for p in landmarks}
    for value, descriptor in model.descriptors.items():
        area_px = model.areas_mm2.get(value, 0.0) / prepared.pixel_area_mm2
        i, row, col = match_point(prepared.features, torch.tensor(descriptor), body_position,
                                  model.locations.get(value), area_px)
        z, y, x = slice_to_volume(i, np.array([row]), np.array([col]), prepared.axis)[0]
        position = prepared.canonical_grid.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        by_value[value] = {"label_value": value, "label": str(model.labels[value].get("name", f"label {value}")),
                           "index": label_image.TransformPhysicalPointToContinuousIndex(position),
                           "position": tuple(position), "method": "matched"}
    return [by_value[v] for v in sorted(by_value)]


def _describe_slice(pick: dict, prepared: PreparedVolume, model: TrainedModel) -> dict:
    """A suggestion in terms a viewer can use: the slice's centre in LPS (Slicer jumps slice views
    to a position) and the slice's index along the propagation axis of the canonical volume."""
    zyx = [s // 2 for s in prepared.shape_zyx]
    zyx[AXIS_INDEX[prepared.axis]] = pick["index"]
    point = prepared.canonical_grid.TransformIndexToPhysicalPoint([int(v) for v in zyx[::-1]])
    return {"axis": prepared.axis, "index": int(pick["index"]), "position_lps": [float(v) for v in point],
            "score": round(pick["score"], 1),
            "labels": [model.labels[model.label_values[k - 1]]["name"] for k in pick["labels"]]}


def _smooth_labels(index: np.ndarray, sigma_mm: float, prepared: PreparedVolume) -> np.ndarray:
    """Joint 3D smoothing: each label's mask (and the background) blurred with a Gaussian of
    ``sigma_mm`` (per-axis in voxels from the spacing), then every voxel takes the most covered."""
    volume = volume_from_slices(index, prepared.axis)
    sigma = [sigma_mm / s for s in prepared.spacing_zyx]
    present = np.unique(volume)
    best = np.zeros(volume.shape, np.float32)
    result = np.zeros_like(volume)
    for value in present:
        blurred = ndimage.gaussian_filter((volume == value).astype(np.float32), sigma)
        win = blurred > best
        result[win] = value
        best[win] = blurred[win]
    return np.ascontiguousarray(slices_along(result, prepared.axis))


def _clean_by_evidence(index, seeds, keep, confidence, model: TrainedModel, prepared: PreparedVolume,
                       report: dict | None = None) -> np.ndarray:
    """The component clean-up (postprocess.py). With a painting: components touching it, cut
    where a label widens again beyond its painting (cut_regrowth), plus, for labels whose name is
    not a known organ, the components the adapter is sure of. Without
    one (another patient): per label the component(s) with the best evidence, none when nothing
    is convincing; chosen twice, the second time against where the other labels were found.
    ``report`` collects the kept components' evidence per label name."""
    config, axis = model.config, prepared.axis
    if seeds is not None:
        cleaned = _clean(index, seeds, keep, config.min_component_voxels, axis)
        if config.cut_regrowth:
            cleaned = cut_regrowth(cleaned, seeds, keep)
        for k, value in enumerate(model.label_values, start=1):
            if is_known_organ(model.labels[value]["name"]):
                continue
            extra = strong_components(volume_from_slices(index == k, axis), volume_from_slices(seeds == k, axis),
                                      volume_from_slices(confidence, axis),
                                      config.min_component_voxels)
            volume_from_slices(cleaned, axis)[extra & (volume_from_slices(cleaned, axis) == 0)] = k
        return cleaned
    volume = volume_from_slices(index, axis)
    conf = volume_from_slices(confidence, axis)
    slice_axis = AXIS_INDEX[axis]
    scanned_mm = len(index) * prepared.slice_spacing_mm      # how far this volume reaches along the axis
    # each label's painted span in this volume's slices: an organ reaches at least that far
    span_slices = {v: painted_span_mm(model, v) / prepared.slice_spacing_mm for v in model.label_values}

    def choose(k, value, anchors=None, expected=None):
        expected = expected or model.locations.get(value)
        area = model.areas_mm2.get(value, 0.0) / prepared.pixel_area_mm2
        voxels = (model.volumes_mm3.get(value, 0.0) * scan_coverage(model, value, scanned_mm)
                  / (prepared.pixel_area_mm2 * prepared.slice_spacing_mm))
        return choose_components(volume == k, conf, keep[k], config.min_component_voxels,
                                 prepared.body_position if expected else None, expected, area, slice_axis, anchors,
                                 voxels, span_slices.get(value, 0.0))

    chosen = {k: choose(k, value) for k, value in enumerate(model.label_values, start=1)}
    # then each label again, from where the others were found: the template's order along the scan,
    # and (relative_place) its in-plane offsets from them
    spacing = prepared.slice_spacing_mm
    found, found_uv = {}, {}
    for k, (mask, _) in chosen.items():
        along = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != slice_axis)))
        if len(along):
            value = model.label_values[k - 1]
            found[value] = centre_bounds(along[0], along[-1], volume.shape[slice_axis], span_slices.get(value, 0.0))
            found_uv[value] = prepared.body_position(
                np.array([ndimage.center_of_mass(mask)], np.float64))[0]
    final = {}
    for k, value in enumerate(model.label_values, start=1):
        offsets = model.axial_offsets_mm.get(value, {})
        anchors = [(found[a], mm / spacing, AXIAL_VARIATION_MM / spacing) for a, mm in offsets.items() if a in found]
        expected = (relative_place(value, model.locations, found_uv) if config.relative_place else None)
        final[k] = choose(k, value, anchors, expected) if anchors or expected else chosen[k]
    cleaned = np.zeros(volume.shape, np.uint8)
    for k, value in enumerate(model.label_values, start=1):
        mask, kept = final[k]
        cleaned[mask] = k
        if report is not None:
            report[model.labels[value]["name"]] = kept
    return np.ascontiguousarray(slices_along(cleaned, axis))


def painted_span_mm(model: TrainedModel, value: int) -> float:
    """How far label ``value`` was painted along the propagation axis (mm; 0 when painted on fewer
    than AXIAL_MIN_SLICES slices): a low estimate of how far the organ reaches."""
    area, volume = model.areas_mm2.get(value, 0.0), model.volumes_mm3.get(value, 0.0)
    return volume / area if area > 0 and volume > 0 else 0.0


def scan_coverage(model: TrainedModel, value: int, scanned_mm: float) -> float:
    """The share of label ``value``'s painted span that a volume reaching ``scanned_mm`` along
    the propagation axis can hold: 1 for a scan longer than the span, less for a slab (a 4 cm CT
    series through the upper abdomen holds 4 cm of a liver painted over 10). The template's
    volume estimate is scaled by it, so an organ cut by the scan's ends is not taken for a
    fragment (measured: such a liver had 0.11 of the unscaled estimate and was "not found")."""
    span = painted_span_mm(model, value)
    return float(min(1.0, scanned_mm / span)) if span > 0 else 1.0


def relative_place(value: int, locations: dict, found_uv: dict) -> list[float] | None:
    """Where the template puts label ``value`` in-plane, taken from where the other labels were
    found on this volume: per found label a, its place plus the template's offset from a to
    ``value``; the median over them, so one label found in the wrong place does not decide. The
    body-relative frame differs between patients by more than organs move against each other
    (CHAOS P2's organs all lie 0.06-0.28 further back than P8's). None without a found label."""
    if value not in locations:
        return None
    own = np.asarray(locations[value][:2], np.float64)
    guesses = [found_uv[a] + own - np.asarray(locations[a][:2], np.float64)
               for a in found_uv if a != value and a in locations]
    if not guesses:
        return None
    return [*np.median(np.stack(guesses), 0).tolist(), *locations[value][2:4]]


def _clean(index, seeds, keep, min_voxels, axis):
    # component analysis is 3D: put the slice axis back where it belongs so neighbours are real
    cleaned = clean_label_map(volume_from_slices(index, axis),
                              None if seeds is None else volume_from_slices(seeds, axis), keep, min_voxels)
    return np.ascontiguousarray(slices_along(cleaned, axis)).astype(np.uint8)


def run(image: sitk.Image, template: sitk.Image, config: PipelineConfig, labels: dict | None = None,
        progress: Progress = _noop, cancel: Callable[[], bool] | None = None,
        session=None, more: list[tuple[sitk.Image, sitk.Image, dict | None]] = ()) -> tuple[TrainedModel, Prediction]:
    """Train on the template slices of ``image`` (and of the ``more`` (image, template, labels)
    of other volumes) and label the rest of ``image``.
    ``session`` (session.Session) keeps backbones and encoded volumes between calls."""
    model, prepared = fit(image, template, config, labels, progress, cancel, session, more)
    prediction = segment(model, prepared, template, progress, cancel)
    prediction.summary["timings"]["train_s"] = model.train_seconds
    prediction.summary["timings"]["encode_s"] += model.encode_seconds
    return model, prediction


def fit(image: sitk.Image, template: sitk.Image, config: PipelineConfig, labels: dict | None = None,
        progress: Progress = _noop, cancel: Callable[[], bool] | None = None, session=None,
        more: list[tuple[sitk.Image, sitk.Image, dict | None]] = (),
        for_other_volumes: bool = False) -> tuple[TrainedModel, PreparedVolume]:
    """The adapter of a run (see run), and the prepared first volume. ``for_other_volumes``: the
    adapter is trained to label other volumes (the "train" task; train_many)."""
    examples = [(image, template, labels)] + list(more)
    for other, other_template, other_labels in examples:   # bad templates fail before the slow encoding
        template_labels(other_template, other, other_labels)
    # location resolved here too, not only in train_many: the session's warm start compares this
    # config with the model's
    config = resolved(config.validate(), image, template, for_other_volumes)
    backbone = _backbone(config, session)
    share = 0.55 / len(examples)
    # on demand: training reads the painted slices, propagation the slices the painting reaches
    prepared = [_prepare(im, config, backbone, _scaled(progress, i * share, share / 0.55), cancel,
                         session if i == 0 else None, on_demand=config.encode_on_demand)
                for i, (im, _, _) in enumerate(examples)]
    start, encoded = time.perf_counter(), sum(p.features.encoder_seconds for p in prepared)
    painting = session.painting_key(template) if session is not None and not more else ""
    previous = session.previous_model(prepared[0], config, painting) if painting else None
    model = train_many([(p, t, lab) for p, (_, t, lab) in zip(prepared, examples)], config, backbone.id,
                       lambda f, s, m: progress(0.55 + 0.05 * f, s, m), cancel, warm_start=previous,
                       for_other_volumes=for_other_volumes)
    if painting:
        session.remember_model(prepared[0], model, painting)
    model.encode_seconds = sum(p.features.encoder_seconds for p in prepared) - encoded
    model.train_seconds = time.perf_counter() - start - model.encode_seconds
    return model, prepared[0]


def _scaled(progress: Progress, offset: float, factor: float) -> Progress:
    return lambda f, s, m: progress(offset + factor * f, s, m)


# Settings that act after the adapter and may differ from training when applying a saved adapter.
RUNTIME_FIELDS = ("device", "precision", "compile", "score_stride_cells", "reachable_only", "cache_dir", "batch_size",
                  "encode_on_demand", "encode_step", "refine",
                  "n_points", "sam_checkpoint", "landmarks", "keep_components", "min_component_voxels",
                  "smooth_across_mm", "smooth_final_mm", "self_support")


def _backbone(config: PipelineConfig, session=None) -> Backbone:
    """The config's backbone: built now, or the session's (built once per process)."""
    return build_backbone_for(config) if session is None else session.backbone(config)


def _prepare(image, config, backbone, progress, cancel, session=None, on_demand=False) -> PreparedVolume:
    """The volume encoded now (or on demand), or the session's copy when it has this volume already."""
    if session is None:
        return prepare_volume(image, config, backbone, progress, cancel, on_demand=on_demand)
    return session.prepare(image, config, backbone, progress, cancel, on_demand=on_demand)


def _backbone_and_volume(image, config, progress, cancel, session):
    backbone = _backbone(config, session)
    return backbone, _prepare(image, config, backbone, progress, cancel, session)


def predict(model: TrainedModel, image: sitk.Image, progress: Progress = _noop,
            cancel: Callable[[], bool] | None = None, overrides: dict | None = None,
            session=None, template: sitk.Image | None = None) -> Prediction:
    """Apply a trained adapter to another volume (another patient, or a later scan).
    ``overrides`` may change the RUNTIME_FIELDS; the others are the adapter's and are ignored.
    ``template``: the painting of ``image`` the adapter was trained on (a re-propagation that
    reuses the adapter of a run): as in ``run`` it anchors the clean-up and comes back on its
    slices exactly as painted; without it the volume is labelled as one never painted."""
    runtime = {k: v for k, v in (overrides or {}).items() if k in RUNTIME_FIELDS}
    config = PipelineConfig.from_dict({**model.config.to_dict(), **runtime})
    model = dataclasses.replace(model, config=config)
    backbone = _backbone(config, session)
    if model.backbone_id and backbone.id != model.backbone_id:
        raise CheckpointError(f"adapter was trained on features of {model.backbone_id}, "
                              f"but the configured backbone gives {backbone.id}")
    _check_modality(model, image, config)
    if template is not None:
        unknown = sorted(set(template_labels(template, image, None)[0]) - set(model.label_values))
        if unknown:
            raise InputError(f"the painting has label values {unknown} the adapter was not trained on "
                             f"(it knows {model.label_values})")
    prepared = _prepare(image, config, backbone, progress, cancel, session)
    return segment(model, prepared, template, progress, cancel)


def _check_modality(model: TrainedModel, image: sitk.Image, config: PipelineConfig) -> None:
    """An adapter learned on CT features does not apply to MRI (or the reverse): say so before encoding."""
    if not model.modality:
        return
    modality = config.modality
    if modality == "auto":
        modality = guess_modality(sitk.GetArrayViewFromImage(image)[::4, ::4, ::4])
    if modality != model.modality:
        raise InputError(f"the adapter was trained on {model.modality.upper()} and this image looks like "
                         f"{modality.upper()}: train an adapter on this modality")
