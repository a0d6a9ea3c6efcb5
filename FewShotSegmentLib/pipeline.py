"""The whole few-shot method on SimpleITK images: encode -> train adapter on template slices ->
score every slice -> 3D component clean-up -> SAM refinement -> label map + landmarks.

Volumes are processed in a canonical LPS orientation chosen from their physical direction
(never from array order), so "axial" means the same thing for every file; results are mapped
back onto the input image's own grid.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import __version__
from .adapters import Adapter, adapter_from_state, create_adapter, sample_training_pixels
from .backbones import Backbone, build_backbone, pick_device
from .config import PipelineConfig
from .errors import Cancelled, CheckpointError, InputError
from .features import VolumeFeatures, encode_volume, slices_along, volume_from_slices
from .landmarks import landmarks_from_label_map
from .postprocess import clean_label_map, default_keep
from .preprocessing import normalize_volume
from .refine import refine_label_slices

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


@dataclass
class TrainedModel:
    adapter: Adapter
    config: PipelineConfig
    label_values: list[int]               # adapter class k (1-based) -> label value
    labels: dict[int, dict]               # label value -> {"name", "color"}
    backbone_id: str

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
                       backbone_id=str(payload["backbone_id"]))
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

    def to_slices(self, image_like: sitk.Image) -> np.ndarray:
        """A label image on the input grid -> (N, H, W) array aligned with slices01."""
        return slices_along(sitk.GetArrayFromImage(_to_canonical(image_like)), self.axis)

    def from_slices(self, stack: np.ndarray) -> sitk.Image:
        volume = volume_from_slices(stack, self.axis)
        canonical = sitk.GetImageFromArray(np.ascontiguousarray(volume).astype(np.uint16))
        canonical.CopyInformation(_to_canonical(self.image))
        original = sitk.DICOMOrient(canonical, _orientation(self.image))
        original.CopyInformation(self.image)  # same grid; drop floating-point noise of the reorient
        return original


def _orientation(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _to_canonical(image: sitk.Image) -> sitk.Image:
    return sitk.DICOMOrient(image, CANONICAL)


def check_image(image: sitk.Image) -> None:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"need a 3D scalar image, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components")
    if min(image.GetSize()) < 1 or sorted(image.GetSize())[1] < 8:
        raise InputError(f"image of size {image.GetSize()} is too small to segment")


def build_backbone_for(config: PipelineConfig) -> Backbone:
    return build_backbone(config.backbone, name=config.backbone_name, checkpoint=config.checkpoint,
                          layer=config.feature_layer, device=config.device)


def prepare_volume(image: sitk.Image, config: PipelineConfig, backbone: Backbone, progress: Progress = _noop,
                   cancel: Callable[[], bool] | None = None, progress_range=(0.0, 0.55)) -> PreparedVolume:
    check_image(image)
    start = time.perf_counter()
    canonical = _to_canonical(image)
    volume = normalize_volume(sitk.GetArrayFromImage(canonical), config.modality, config.ct_window)
    slices = slices_along(volume, config.axis)
    features = encode_volume(slices, backbone, batch_size=config.batch_size, cache_dir=config.cache_dir,
                             progress=progress, cancel=cancel, progress_range=progress_range)
    return PreparedVolume(image, slices, features, config.axis, time.perf_counter() - start)


def template_labels(template: sitk.Image, image: sitk.Image, labels: dict | None) -> tuple[list[int], dict[int, dict]]:
    """Label values to learn (those painted, restricted to ``labels`` when given) and their metadata."""
    if template.GetSize() != image.GetSize():
        raise InputError(f"template size {template.GetSize()} != image size {image.GetSize()}")
    values = np.unique(sitk.GetArrayViewFromImage(template))
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
          backbone_id: str = "", progress: Progress = _noop) -> TrainedModel:
    values, meta = template_labels(template, prepared.image, labels)
    index_map = _to_index(prepared.to_slices(template), values)
    template_slices = [i for i in range(len(index_map)) if index_map[i].any()]
    present = set(np.unique(index_map[template_slices]).tolist()) - {0}
    if len(present) < len(values):
        raise InputError("a label has no template pixels along the chosen axis")
    rng = np.random.default_rng(config.seed)
    pixels = sample_training_pixels(prepared.features, index_map, template_slices, config.samples_per_label,
                                    config.negative_margin_px, rng)
    options = {"basic": dict(threshold=config.threshold, center_features=config.center_features),
               "classification": dict(epochs=config.epochs),
               "contrastive": dict(steps=config.steps, threshold=config.threshold)}[config.adapter]
    adapter = create_adapter(config.adapter, seed=config.seed, **options)
    torch.manual_seed(config.seed)
    adapter.fit(pixels, progress=lambda f, m: progress(f, "train", m))
    return TrainedModel(adapter, config, values, meta, backbone_id)


def _to_index(stack: np.ndarray, values: list[int]) -> np.ndarray:
    index = np.zeros(stack.shape, np.uint8)
    for k, value in enumerate(values, start=1):
        index[stack == value] = k
    return index


def score_volume(model: TrainedModel, prepared: PreparedVolume, progress: Progress = _noop,
                 cancel: Callable[[], bool] | None = None) -> np.ndarray:
    """(N, H, W) adapter class per pixel (0 background, k = k-th label)."""
    features = prepared.features
    h, w = features.slice_shape
    # Feature cells are 4 / scale pixels (LiteMedSAM); scoring every pixel of a cell several times
    # adds nothing, so score on a grid of about half a cell and interpolate the scores.
    stride = max(1, int(round(features.frame[0] / features.features.shape[2] / features.scale / 2)))
    out = np.zeros((len(features), h, w), np.uint8)
    for i in range(len(features)):
        if cancel and cancel():
            raise Cancelled("cancelled while propagating")
        scores = model.adapter.score_slice(features, i, stride)
        if stride > 1:
            scores = F.interpolate(scores[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        out[i] = scores.argmax(0).numpy()
        progress((i + 1) / len(features), "propagate", f"slice {i + 1}/{len(features)}")
    return out


def segment(model: TrainedModel, prepared: PreparedVolume, template: sitk.Image | None = None,
            progress: Progress = _noop, cancel: Callable[[], bool] | None = None,
            keep_stages: bool = False) -> Prediction:
    """Label every slice of ``prepared``; ``template`` (same image) seeds the component clean-up."""
    config = model.config
    timings = {"encode_s": prepared.seconds}
    start = time.perf_counter()
    index = score_volume(model, prepared, lambda f, s, m: progress(0.6 + 0.2 * f, s, m), cancel)
    timings["propagate_s"] = time.perf_counter() - start
    values = np.array([0] + model.label_values, dtype=np.uint16)
    stages = {}
    if keep_stages:
        stages["adapter"] = prepared.from_slices(values[index])
    keep = {k: config.keep_components or default_keep(model.labels[v]["name"])
            for k, v in enumerate(model.label_values, start=1)}
    seeds = None if template is None else _to_index(prepared.to_slices(template), model.label_values)
    index = _clean(index, seeds, keep, config.min_component_voxels, config.axis)
    if keep_stages:
        stages["components"] = prepared.from_slices(values[index])
    if config.refine != "none":
        start = time.perf_counter()
        index = refine_label_slices(index, prepared.features, prepared.slices01, config.refine, config.n_points,
                                    config.seed, config.sam_checkpoint, pick_device(config.device),
                                    lambda f, m: progress(0.8 + 0.18 * f, "refine", m), cancel)
        index = _clean(index, seeds, keep, config.min_component_voxels, config.axis)
        timings["refine_s"] = time.perf_counter() - start
    label_image = prepared.from_slices(values[index])
    landmarks = landmarks_from_label_map(label_image, model.labels) if config.landmarks else []
    counts = {model.labels[v]["name"]: int((values[index] == v).sum()) for v in model.label_values}
    missing = [name for name, n in counts.items() if n == 0]
    summary = {"voxels": counts, "not_found": missing, "timings": timings,
               "landmarks": [{"label": p["label"], "position_lps": list(p["position"])} for p in landmarks]}
    progress(1.0, "done", "segmentation finished" + (f"; not found: {missing}" if missing else ""))
    if keep_stages:
        stages["refined" if config.refine != "none" else "final"] = label_image
    return Prediction(label_image, landmarks, summary, stages)


def _clean(index, seeds, keep, min_voxels, axis):
    # component analysis is 3D: put the slice axis back where it belongs so neighbours are real
    cleaned = clean_label_map(volume_from_slices(index, axis),
                              None if seeds is None else volume_from_slices(seeds, axis), keep, min_voxels)
    return np.ascontiguousarray(slices_along(cleaned, axis)).astype(np.uint8)


def run(image: sitk.Image, template: sitk.Image, config: PipelineConfig, labels: dict | None = None,
        progress: Progress = _noop, cancel: Callable[[], bool] | None = None) -> tuple[TrainedModel, Prediction]:
    """Train on the template slices of ``image`` and label the rest of the same image."""
    config.validate()
    template_labels(template, image, labels)  # fail on a bad template before the slow encoding
    backbone = build_backbone_for(config)
    prepared = prepare_volume(image, config, backbone, progress, cancel)
    start = time.perf_counter()
    model = train(prepared, template, config, labels, backbone.id, lambda f, s, m: progress(0.55 + 0.05 * f, s, m))
    train_s = time.perf_counter() - start
    prediction = segment(model, prepared, template, progress, cancel)
    prediction.summary["timings"]["train_s"] = train_s
    return model, prediction


# Settings that act after the adapter and may differ from training when applying a saved adapter.
RUNTIME_FIELDS = ("device", "cache_dir", "batch_size", "refine", "n_points", "sam_checkpoint", "landmarks",
                  "keep_components", "min_component_voxels")


def predict(model: TrainedModel, image: sitk.Image, progress: Progress = _noop,
            cancel: Callable[[], bool] | None = None, overrides: dict | None = None) -> Prediction:
    """Apply a trained adapter to another volume (another patient, or a later scan).
    ``overrides`` may change the RUNTIME_FIELDS; the others are the adapter's and are ignored."""
    runtime = {k: v for k, v in (overrides or {}).items() if k in RUNTIME_FIELDS}
    config = PipelineConfig.from_dict({**model.config.to_dict(), **runtime})
    model = TrainedModel(model.adapter, config, model.label_values, model.labels, model.backbone_id)
    backbone = build_backbone_for(config)
    if model.backbone_id and backbone.id != model.backbone_id:
        raise CheckpointError(f"adapter was trained on features of {model.backbone_id}, "
                              f"but the configured backbone gives {backbone.id}")
    prepared = prepare_volume(image, config, backbone, progress, cancel)
    return segment(model, prepared, None, progress, cancel)
