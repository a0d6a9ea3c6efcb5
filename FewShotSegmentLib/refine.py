"""SAM refinement: prompts from each localized 2D region become final masks.

LiteMedSAM (default) reuses the image embeddings computed during encoding. Measured here it
follows box prompts only (template-slice liver: box Dice 0.90, 10 points 0.26), so the default is
one box per 2D connected component of each label; the paper's 10 random points are available as
``strategy="points"``. With a segment-anything checkpoint (ViT-B/L/H) the slice is re-encoded by
SAM and the same prompts are used.
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .acceleration import resolve_precision
from .mask_decoder import LOW_RES_PER_TOKEN, first_mask_logits
from .backbones import load_litemedsam, load_state_dict
from .postprocess import values_present
from .runtime import map_on_idle_cores, small_ops
from .errors import Cancelled, CheckpointError, InputError

MIN_COMPONENT_PIXELS = 5


def component_prompts(mask2d: np.ndarray, strategy: str, n_points: int, rng: np.random.Generator,
                      box_margin: int = 2):
    """One prompt per 2D connected component: (box xyxy or None, points (n, 2) xy or None)."""
    labeled, n = ndimage.label(mask2d)
    prompts = []
    for index, region in enumerate(ndimage.find_objects(labeled), start=1):
        component = labeled[region] == index
        if component.sum() < MIN_COMPONENT_PIXELS:
            continue
        if strategy == "box":
            r0, r1 = region[0].start, region[0].stop - 1
            c0, c1 = region[1].start, region[1].stop - 1
            h, w = mask2d.shape
            box = np.array([max(0, c0 - box_margin), max(0, r0 - box_margin),
                            min(w - 1, c1 + box_margin), min(h - 1, r1 + box_margin)], dtype=np.float32)
            prompts.append((box, None))
        elif strategy == "points":
            rows, cols = np.nonzero(labeled == index)
            pick = rng.choice(len(rows), size=min(n_points, len(rows)), replace=False)
            prompts.append((None, np.stack([cols[pick], rows[pick]], 1).astype(np.float32)))
        else:
            raise InputError(f"refinement strategy must be 'box' or 'points', got {strategy!r}")
    return prompts


class LiteMedSAMRefiner:
    """Decodes prompts against the LiteMedSAM embeddings stored with the volume features."""

    def __init__(self, checkpoint: str = "", device: torch.device | str = "cpu", precision: str = "fp32"):
        self.model = load_litemedsam(checkpoint)
        self.device = torch.device(device)
        self.model.to(self.device)
        # bf16 where the device has fast bf16 units (precision "auto" there): the mask decoder as a
        # bf16 copy (autocast would convert its weights and the 4096 image tokens at every linear)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.decoder = _mask_decoder(self.model, self.device, self.dtype)

    @torch.inference_mode()
    def logits(self, embedding: torch.Tensor, scale: float, slice_shape, box=None, points=None) -> np.ndarray:
        """Mask logits on the slice grid for one prompt; box xyxy / points xy in slice pixels."""
        pts = None
        if points is not None:
            coords = torch.as_tensor((points + 0.5) * scale, device=self.device)[None]
            pts = (coords, torch.ones(coords.shape[:2], device=self.device, dtype=torch.int))
        boxes = None if box is None else np.asarray(box, np.float32)[None]
        return self._decode(embedding, scale, slice_shape, boxes, pts)[0]

    @torch.inference_mode()
    def box_logits(self, embedding: torch.Tensor, scale: float, slice_shape, boxes: np.ndarray) -> np.ndarray:
        """(B, H, W) logits for B boxes (B, 4) xyxy on one slice, in ONE decoder batch (the decoder
        repeats the image embedding per prompt), instead of B decoder calls."""
        return self._decode(embedding, scale, slice_shape, np.asarray(boxes, np.float32), None)

    def _decode(self, embedding, scale, slice_shape, boxes, pts) -> np.ndarray:
        h, w = slice_shape
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))    # the slice on the 256 grid
        box_tensor = None if boxes is None else torch.as_tensor((boxes + 0.5) * scale, device=self.device)[:, None]
        sparse, dense = self.model.prompt_encoder(points=pts, boxes=box_tensor, masks=None)
        # without a mask prompt the dense embedding is the same for every prompt: one copy;
        # a box prompt's logits are drawn only around its box (the rest is -inf anyway)
        crops = None if boxes is None else box_token_crops(boxes, (h, w), (nh, nw), embedding.shape[-2:])
        low = first_mask_logits(self.decoder, *(t.to(device=self.device, dtype=self.dtype) for t in (
            embedding[None], self.model.prompt_encoder.get_dense_pe(), sparse, dense[:1])), crops=crops).float()
        return F.interpolate(low[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()


def box_token_crops(boxes: np.ndarray, slice_shape, low_shape, token_shape) -> torch.Tensor:
    """(B, 4) token rectangles (row0, row1, col0, col1; ends exclusive) whose low-resolution
    logits the bilinear resize back to the slice reads for the pixels of each box (B, 4) xyxy
    (inclusive pixel indices), with one token to spare on each side."""
    def span(lo, hi, size, low_size, tokens):
        # output pixel y reads the low-resolution pixels floor(s) and floor(s) + 1,
        # s = (y + 0.5) * low_size / size - 0.5 (align_corners=False)
        first = np.floor((lo + 0.5) * low_size / size - 0.5)
        last = np.floor((hi + 0.5) * low_size / size - 0.5) + 1
        t0 = np.clip(np.floor(np.maximum(first, 0) / LOW_RES_PER_TOKEN) - 1, 0, tokens)
        t1 = np.clip(np.floor(np.minimum(last, low_size - 1) / LOW_RES_PER_TOKEN) + 2, 0, tokens)
        return t0, t1

    boxes = np.asarray(boxes, np.float64)
    (h, w), (nh, nw), (th, tw) = slice_shape, low_shape, token_shape
    r0, r1 = span(boxes[:, 1], boxes[:, 3], h, nh, th)
    c0, c1 = span(boxes[:, 0], boxes[:, 2], w, nw, tw)
    return torch.as_tensor(np.stack([r0, r1, c0, c1], 1).astype(np.int64))


_DECODERS: dict[tuple, torch.nn.Module] = {}


def _mask_decoder(model, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """LiteMedSAM's mask decoder in ``dtype`` on ``device`` (a copy, made once, when not fp32)."""
    if dtype == torch.float32:
        return model.mask_decoder
    key = (id(model), str(device), dtype)
    if key not in _DECODERS:
        _DECODERS[key] = copy.deepcopy(model.mask_decoder).to(device=device, dtype=dtype).eval()
    return _DECODERS[key]


class SAMRefiner:
    """segment-anything SAM (ViT-B/L/H) from a local checkpoint; re-encodes each refined slice."""

    def __init__(self, checkpoint: str, device: torch.device | str = "cpu"):
        from segment_anything import SamPredictor, sam_model_registry

        state = load_state_dict(checkpoint)
        width = state.get("image_encoder.patch_embed.proj.weight")
        kind = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}.get(None if width is None else width.shape[0])
        if kind is None:
            raise CheckpointError(f"{checkpoint} is not a segment-anything SAM checkpoint")
        sam = sam_model_registry[kind](checkpoint=None)
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint} does not fit SAM {kind}: {str(exc)[:300]}") from None
        self.predictor = SamPredictor(sam.to(device).eval())
        self._current = None

    def set_slice(self, key, image01: np.ndarray):
        if self._current != key:
            rgb = np.repeat((np.clip(image01, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1)
            self.predictor.set_image(rgb)
            self._current = key

    def logits(self, box=None, points=None) -> np.ndarray:
        labels = None if points is None else np.ones(len(points), dtype=np.int64)
        _, _, low = self.predictor.predict(point_coords=points, point_labels=labels, box=box,
                                           multimask_output=False, return_logits=True)
        masks = self.predictor.model.postprocess_masks(torch.as_tensor(low)[None], self.predictor.input_size,
                                                       self.predictor.original_size)
        return masks[0, 0].cpu().numpy()


def _make_refiner(features, sam_checkpoint: str, device, precision: str = "fp32"):
    if sam_checkpoint:
        return SAMRefiner(sam_checkpoint, device)
    if features.sam_embeddings is None:
        raise InputError("LiteMedSAM refinement needs LiteMedSAM embeddings; use a LiteMedSAM backbone "
                         "or give a SAM checkpoint")
    return LiteMedSAMRefiner(device=device, precision=precision)


class DecodedBoxes:
    """LiteMedSAM's answer to each box prompt already asked on a volume, kept with the volume's
    features (``features.decoded_boxes``): the logits depend only on the slice's embedding and
    the box, so a re-propagation whose clean-up gives a slice the same box as before reuses them
    instead of running the decoder again. Each answer is stored cropped to its box (outside it
    the logits are -inf anyway); the oldest go first beyond ``max_bytes``. Slice workers of one
    refinement share it (a lock)."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: dict[tuple, np.ndarray] = {}
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, features) -> "DecodedBoxes":
        cache = getattr(features, "decoded_boxes", None)
        if cache is None:
            cache = features.decoded_boxes = cls()
        return cache

    @staticmethod
    def key(index, box, device, precision: str = "fp32") -> tuple:
        return (int(index), tuple(int(v) for v in box), str(device), precision)

    def get(self, key) -> np.ndarray | None:
        """The logits on the key's box, or None."""
        with self._lock:
            crop = self.entries.get(key)
            if crop is None:
                self.misses += 1
                return None
            self.hits += 1
            return crop

    def put(self, key, crop: np.ndarray) -> None:
        with self._lock:
            if key in self.entries:       # another slice worker answered it too
                self.bytes -= self.entries[key].nbytes
            self.entries[key] = crop
            self.bytes += crop.nbytes
            while self.bytes > self.max_bytes and self.entries:
                self.bytes -= self.entries.pop(next(iter(self.entries))).nbytes


def _slice_logits(refiner, features, slices01, index, shape, prompts) -> list[tuple[tuple, np.ndarray]]:
    """SAM's logits on slice ``index`` for each (box, points) prompt, as (region, logits there):
    a box prompt's region is its box (SAM may draw past a box, but what it was asked about lies
    inside it), a points prompt's the whole slice. So refinement works on boxes, not on whole
    slices (a 512x512 CT slice asks 5-13 boxes)."""
    if isinstance(refiner, LiteMedSAMRefiner) and prompts and all(p is None for _, p in prompts):
        return _cached_box_logits(refiner, features, index, shape, [b for b, _ in prompts])
    if isinstance(refiner, SAMRefiner):
        refiner.set_slice(index, slices01[index])
        logits = [refiner.logits(box=b, points=p) for b, p in prompts]
    else:
        logits = [refiner.logits(features.sam_embeddings[index], features.scale, shape, box=b, points=p)
                  for b, p in prompts]
    out = []
    for logit, (box, _) in zip(logits, prompts):
        region = (slice(None), slice(None)) if box is None else box_region(box)
        out.append((region, logit[region]))
    return out


def box_region(box) -> tuple[slice, slice]:
    """The pixels of a box xyxy (inclusive), as an index into a slice."""
    c0, r0, c1, r1 = np.asarray(box).astype(int)
    return slice(r0, r1 + 1), slice(c0, c1 + 1)


def _cached_box_logits(refiner, features, index, shape, boxes) -> list[tuple[tuple, np.ndarray]]:
    """LiteMedSAM box prompts of one slice: those not answered before on this volume
    (DecodedBoxes) decoded in one batch."""
    cache = DecodedBoxes.of(features)
    keys = [cache.key(index, box, refiner.device, refiner.precision) for box in boxes]
    crops = [cache.get(key) for key in keys]
    missing = [i for i, crop in enumerate(crops) if crop is None]
    if missing:
        decoded = refiner.box_logits(features.sam_embeddings[index], features.scale, shape,
                                     np.array([keys[i][1] for i in missing], np.float32))
        for i, logit in zip(missing, decoded):
            crops[i] = logit[box_region(keys[i][1])].copy()     # not a view: the batch is let go
            cache.put(keys[i], crops[i])
    return [(box_region(key[1]), crop) for key, crop in zip(keys, crops)]


def refinement_agreement(template: np.ndarray, painted: list[int], features, slices01: np.ndarray,
                         strategy: str = "box", n_points: int = 10, seed: int = 0, sam_checkpoint: str = "",
                         device="cpu", precision: str = "fp32") -> dict[int, float]:
    """{label index: Dice between the painting and SAM prompted from the painting itself}, over the
    painted slices. This is the evidence the user already gave of whether SAM can draw a label:
    a solid organ is reproduced (Dice ~0.9), a ring or a wall around a lumen is filled (low Dice)."""
    rng = np.random.default_rng(seed)
    refiner = _make_refiner(features, sam_checkpoint, device, precision)
    with small_ops():
        return _agreement(template, painted, refiner, features, slices01, strategy, n_points, rng)


def _agreement(template, painted, refiner, features, slices01, strategy, n_points, rng):
    overlap, total = {}, {}
    for index in painted:
        plane = template[index]
        for value in np.unique(plane[plane > 0]):
            mask = plane == value
            drawn = np.zeros(plane.shape, bool)
            for region, logit in _slice_logits(refiner, features, slices01, index, plane.shape,
                                               component_prompts(mask, strategy, n_points, rng)):
                drawn[region] |= logit > 0
            overlap[value] = overlap.get(value, 0) + 2 * int((drawn & mask).sum())
            total[value] = total.get(value, 0) + int(drawn.sum() + mask.sum())
    return {int(v): overlap[v] / total[v] if total[v] else 0.0 for v in overlap}


def refine_label_slices(labels: np.ndarray, features, slices01: np.ndarray, strategy: str = "box",
                        n_points: int = 10, seed: int = 0, sam_checkpoint: str = "", device="cpu",
                        progress: Callable | None = None, cancel: Callable | None = None,
                        refine_values=None, skip_slices=(), precision: str = "fp32") -> np.ndarray:
    """Refine an (N, H, W) label-index stack slice by slice; returns a new stack.

    Only labels in ``refine_values`` (default: all) are refined; the others keep their pixels, and
    a refined label never takes a pixel from them (a core refined inside its unrefined rim stays
    inside). Each refined label's mask is the union of its components' SAM masks; where refined
    labels compete for a pixel the highest logit wins. ``skip_slices`` (the painted ones) are
    copied unchanged, and so are slices without labels.
    """
    rng = np.random.default_rng(seed)
    present = set(values_present(labels).tolist()) - {0}
    refine_values = present if refine_values is None else set(refine_values) & present
    out = labels.copy()
    if not refine_values:
        return out
    refiner = _make_refiner(features, sam_checkpoint, device, precision)
    skip = set(skip_slices)
    fixed = np.array(sorted(present - refine_values), dtype=labels.dtype)
    busy = [i for i in range(len(labels)) if i not in skip and np.isin(labels[i], list(refine_values)).any()]

    def refined(index):
        return _refine_slice(labels[index], refiner, features, slices01, index, strategy, n_points, rng,
                             refine_values, fixed)

    finished = 0

    def store(index, plane):
        nonlocal finished
        out[index] = plane
        finished += 1
        if progress:
            progress(finished / len(busy), f"refined slice {finished}/{len(busy)}")
        if cancel and cancel():
            raise Cancelled("cancelled during refinement")

    if cancel and cancel():
        raise Cancelled("cancelled during refinement")
    if strategy == "box" and isinstance(refiner, LiteMedSAMRefiner):
        # slices independent of each other: on idle cores several at once, one thread each
        features.ensure(busy)       # encoded here, not inside a slice worker (a no-op after scoring)
        map_on_idle_cores(refined, busy, store)
    else:
        # points are drawn from one generator in slice order, and SAMRefiner holds one slice
        for index in busy:
            with small_ops():
                store(index, refined(index))
    return out


def _refine_slice(plane, refiner, features, slices01, index, strategy, n_points, rng, refine_values, fixed):
    """One slice: each refined label's components prompted in turn, the highest logit wins."""
    claimable = ~np.isin(plane, fixed)
    result = np.where(claimable, 0, plane).astype(plane.dtype)
    best = np.full(plane.shape, 0.0, dtype=np.float32)   # logit 0 = SAM's decision boundary
    prompts, owners = [], []
    for value in sorted(refine_values & set(np.unique(plane).tolist())):
        for prompt in component_prompts(plane == value, strategy, n_points, rng):
            prompts.append(prompt)
            owners.append(value)
    for value, (region, logit) in zip(owners, _slice_logits(refiner, features, slices01, index, plane.shape,
                                                            prompts)):
        win = (logit > best[region]) & claimable[region]
        result[region][win] = value
        best[region][win] = logit[win]
    return result
