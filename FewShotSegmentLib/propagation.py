"""Propagation: the adapter's decision on every slice along the propagation axis.

Each slice is scored on a grid of feature cells (coarse to fine, adaptive_scores), its class
probabilities are averaged with its neighbours' (smooth_across_mm) and every pixel takes the most
probable class. On a painted volume whose labels are all known organs, the clean-up keeps only the
components that touch the painting, so only the slices such a component can reach are scored
(score_volume's ``reach_from``): sweeping out from the painted slices, scoring stops where no pixel
of any label connects to the painting any more (segment scores the slices the next-slice suggestions read later).
On idle cores the raw scores of the slices next in line are computed side by side, one torch
thread each (SliceDecisions.prefetch); the decisions are the same whatever the order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .acceleration import resolve_precision
from .errors import Cancelled
from .guidance import uncertainty_from_margin
from .location import PATIENT_VARIATION, slice_to_volume
from .runtime import map_on_idle_cores, small_ops

if TYPE_CHECKING:   # pipeline imports this module
    from .pipeline import PreparedVolume, TrainedModel

Progress = Callable[[float, str, str], None]
IN_PLANE_8 = np.ones((3, 3), bool)     # a 2D section of the clean-up's 26-connectivity


def _noop(fraction, stage, message):
    pass


def neighbour_weights(sigma_mm: float, spacing_mm: float) -> np.ndarray:
    """Gaussian weights for the slices around a slice (odd length, its own weight in the middle),
    for a sigma in mm; a single 1 when the slices are too far apart for it to matter."""
    sigma = sigma_mm / max(spacing_mm, 1e-6)
    radius = min(3, int(np.ceil(2 * sigma))) if sigma >= 0.3 else 0
    offsets = np.arange(-radius, radius + 1)
    return np.exp(-0.5 * (offsets / max(sigma, 1e-6)) ** 2)


def upsample_scores(scores: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """(C, H', W') scores sampled at pixels 0, s, 2s, ... -> (C, H, W) on every pixel.

    The samples sit ON pixels (features.VolumeFeatures.dense), so this interpolates between sample
    positions (align_corners=True onto the (H'-1)s+1 pixels they span) and repeats the last sample
    over the < s pixels beyond it; cell-centre interpolation would move masks by (s-1)/2 pixels."""
    if stride == 1:
        return scores
    h, w = size
    hh, ww = scores.shape[1:]
    span = ((hh - 1) * stride + 1, (ww - 1) * stride + 1)
    up = F.interpolate(scores[None], size=span, mode="bilinear", align_corners=True) if hh > 1 and ww > 1 \
        else F.interpolate(scores[None], size=span, mode="nearest")
    return F.pad(up, (0, w - span[1], 0, h - span[0]), mode="replicate")[0]


SETTLED_MARGIN = 0.2     # adaptive_scores: a coarse point leading by this much, among like neighbours, is settled


def adaptive_scores(adapter, features, index: int, stride: int, margin: float = SETTLED_MARGIN) -> torch.Tensor:
    """(C, H', W') scores on every ``stride``-th pixel, as ``adapter.score_slice(features, index,
    stride)``, computed coarse to fine: the adapter scores every other point of that grid, the
    rest is interpolated, and only points near a coarse point that is not settled (its winner
    differs from a neighbour's, or leads the runner-up by less than ``margin``) are scored
    exactly. Measured on CHAOS P1 and the demo CT (one slice per organ): 14-16 % of the points
    are scored exactly and 0.01-0.02 % of them change class, for 2.5x less adapter work."""
    h, w = features.slice_shape
    rows, cols = np.arange(0, h, stride), np.arange(0, w, stride)
    if len(rows) < 8 or len(cols) < 8:
        return adapter.score_slice(features, index, stride)
    coarse = adapter.score_slice(features, index, 2 * stride)          # the fine grid's even points
    fine = upsample_scores(coarse, (len(rows), len(cols)), 2)
    top = coarse.topk(min(2, len(coarse)), dim=0)
    winner = top.indices[0].float()[None, None]
    mixed = F.max_pool2d(winner, 3, 1, 1) != -F.max_pool2d(-winner, 3, 1, 1)
    unsettled = mixed[0, 0] | (top.values[0] - top.values[-1] < margin)
    near = upsample_scores(unsettled[None].float(), fine.shape[1:], 2)[0] > 0
    near[2 * (coarse.shape[1] - 1) + 1:] = True          # beyond the last coarse row / column: extrapolated
    near[:, 2 * (coarse.shape[2] - 1) + 1:] = True
    ii, jj = torch.nonzero(near, as_tuple=True)
    if len(ii):
        fine[:, ii, jj] = adapter.score_pixels(features, index, rows[ii.numpy()], cols[jj.numpy()]).to(fine.dtype)
    return fine


@dataclass
class VolumeScores:
    """The adapter's decision on the slices along the propagation axis, (N, H, W) each; slices not
    in ``scored`` are background with no doubt (see score_volume's ``reach_from``)."""
    index: np.ndarray           # uint8: winning class (0 background, k = k-th label)
    runner_up: np.ndarray       # uint8: second most probable class
    uncertainty: np.ndarray     # uint8 0..255 (guidance.uncertainty_from_margin)
    confidence: np.ndarray      # uint8 0..255: the winning class's probability
    scored: np.ndarray = field(default=None)   # (N,) bool: slices decided
    _slices: "SliceDecisions | None" = field(default=None, repr=False)

    def covers(self, labels: np.ndarray) -> bool:
        """True when ``labels`` ((N, H, W), a cleaned result) cannot continue onto an unscored
        slice: every slice is scored, or no label voxel lies on a scored slice next to an
        unscored one."""
        if self.scored.all():
            return True
        unscored = ~self.scored
        edge = self.scored & (np.r_[unscored[1:], False] | np.r_[False, unscored[:-1]])
        return not labels[edge].any()

    def score(self, slices) -> None:
        """Decide these slices too (those already scored are skipped)."""
        for j in slices:
            self._slices.decide(int(j))

    def score_all(self) -> None:
        """Decide the slices left unscored (when a kept component reaches an unscored slice)."""
        self.score(np.flatnonzero(~self.scored))


class SliceDecisions:
    """Decides slices on demand, in any order: a slice's raw scores are computed once and kept
    only while a slice within the smoothing radius is still undecided (a sweep in one direction
    holds 2 x radius + 1 of them)."""

    def __init__(self, model: "TrainedModel", prepared: "PreparedVolume", use_prior: bool = False,
                 progress: Progress = _noop, cancel: Callable[[], bool] | None = None):
        self.features = prepared.adapter_features(model.config.location)
        self.adapter, self.config = model.adapter, model.config
        self.n = len(self.features)
        h, w = self.shape = self.features.slice_shape
        # Feature cells are 4 / scale pixels (LiteMedSAM); scoring every pixel of a cell several times
        # adds nothing, so score on a grid of ``score_stride_cells`` cells and interpolate the scores.
        cell = self.features.frame[0] / self.features.features.shape[2] / self.features.scale   # (N, C, h, w)
        self.stride = max(1, int(round(cell * self.config.score_stride_cells)))
        self.weights = neighbour_weights(self.config.smooth_across_mm, prepared.slice_spacing_mm)
        self.radius = len(self.weights) // 2
        # bf16 where the encoder runs bf16 (the CPU has AMX / AVX512-BF16): the adapter's matmuls
        # on those units
        self.bf16 = resolve_precision(self.config.precision, torch.device("cpu")) == "bf16"
        self.prior = LocationPrior(model, prepared, self.stride) \
            if use_prior and self.config.location_prior > 0 and model.locations else None
        self.progress, self.cancel = progress, cancel
        self.out = VolumeScores(*(np.zeros((self.n, h, w), np.uint8) for _ in range(4)),
                                scored=np.zeros(self.n, bool), _slices=self)
        self._raw: dict[int, torch.Tensor] = {}

    def _raw_scores(self, i: int) -> torch.Tensor:
        scores = self._raw.get(i)
        if scores is None:
            self._check_cancel()        # before encoding it too
            # a slice not encoded yet is encoded now, at the encoder's own threads and precision
            self.features.ensure([i])
            # small ops: more threads only on idle cores (runtime.small_ops)
            with small_ops():
                scores = self._raw[i] = self._compute_raw(i)
        return scores

    def _compute_raw(self, i: int) -> torch.Tensor:
        """Slice i's scores on the stride grid (its features encoded already); safe to call from
        several threads at once."""
        self._check_cancel()
        # autocast is per thread: entered here, in the thread that scores
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            scores = (adaptive_scores(self.adapter, self.features, i, self.stride)
                      if self.config.adaptive_scoring
                      else self.adapter.score_slice(self.features, i, self.stride)).float()
        return scores if self.prior is None else self.prior.apply(scores, i)

    def _check_cancel(self) -> None:
        if self.cancel and self.cancel():
            raise Cancelled("cancelled while propagating")

    def prefetch(self, slices, ahead=()) -> None:
        """The raw scores of these slices computed now, side by side on idle cores (one torch
        thread each: 1.1-1.4x faster than two threads on each slice in turn, on 2 cores), for the
        decisions that follow; those of the slices ``ahead`` too where they need no encoding.
        Slices out of range or held already are skipped; the others are encoded here first if
        they are not yet, one after another as decide would, with the encoder's own threads."""
        r, scored = self.radius, self.out.scored

        def wanted(i):      # in range, not held, and read by a slice still undecided
            return 0 <= i < self.n and i not in self._raw and not scored[max(0, i - r):i + r + 1].all()

        todo = [i for i in dict.fromkeys(int(i) for i in slices) if wanted(i)]
        for i in todo:
            self._check_cancel()
            self.features.ensure([i])
        if ahead:
            encoded = self.features.encoded
            todo += [i for i in ahead if wanted(i) and i not in todo and encoded[self.features.sources([i])].all()]
        if len(todo) > 1:
            map_on_idle_cores(self._compute_raw, todo, self._raw.__setitem__)

    def decide(self, j: int) -> None:
        """Slice j's decision from its own and its neighbours' scores (no-op when decided)."""
        out, r = self.out, self.radius
        if out.scored[j]:
            return
        near = [(self.weights[d + r], self._raw_scores(j + d)) for d in range(-r, r + 1) if 0 <= j + d < self.n]
        scores = sum(float(wt) * sc for wt, sc in near) / sum(float(wt) for wt, _ in near)
        full = upsample_scores(scores, self.shape, self.stride)
        top = full.topk(min(2, len(full)), dim=0)
        out.index[j] = top.indices[0].numpy()
        out.runner_up[j] = top.indices[-1].numpy()
        out.confidence[j] = np.round(top.values[0].clamp(0, 1).numpy() * 255).astype(np.uint8)
        # from the top two already found (np.partition + np.sort of the scores cost 9 ms a 512x512 slice)
        out.uncertainty[j] = (uncertainty_from_margin((top.values[0] - top.values[1]).numpy()) if len(full) > 1
                              else 0)
        out.scored[j] = True
        for i in range(j - r, j + r + 1):       # raw scores no undecided slice needs any more
            if i in self._raw and out.scored[max(0, i - r):i + r + 1].all():
                del self._raw[i]
        done = int(out.scored.sum())
        self.progress(done / self.n, "propagate", f"slice {done}/{self.n}")


def score_volume(model: "TrainedModel", prepared: "PreparedVolume", progress: Progress = _noop,
                 cancel: Callable[[], bool] | None = None, use_prior: bool = False,
                 reach_from: np.ndarray | None = None) -> VolumeScores:
    """Adapter class per pixel, with the runner-up and the uncertainty between them.

    Each slice's class probabilities are averaged with its neighbours' (``smooth_across_mm``)
    before the decision, so an organ's outline does not jump from slice to slice. Only the
    window of neighbouring slices is held in memory.

    ``reach_from``: the painting as (N, H, W) label indices; then only the slices that a
    component touching it can reach are scored (reachable_slices). Exact for a clean-up that keeps
    only such components, as long as the result does not touch the last scored slice
    (VolumeScores.covers; score_all decides the rest)."""
    slices = SliceDecisions(model, prepared, use_prior, progress, cancel)
    if reach_from is None:
        decide_in_chunks(slices, 0, slices.n)
    else:
        reachable_slices(slices, reach_from)
    progress(1.0, "propagate", f"{int(slices.out.scored.sum())} of {slices.n} slices scored")
    return slices.out


def reachable_slices(slices: SliceDecisions, seeds: np.ndarray) -> None:
    """Decide the slices between the outermost painted slices, then sweep outwards from each,
    following every label's pixels connected (26-connectivity, slice to slice) to its painting,
    until no label pixel is connected any more.

    A path from the painting to a slice beyond must cross every slice in between at a pixel
    already connected to the painting, so a slice without any is a wall; the clean-up's own 3D
    components (VolumeScores.covers) check the rare path that turns back from beyond."""
    painted = np.flatnonzero(seeds.reshape(len(seeds), -1).any(1))
    if len(painted) == 0:
        raise ValueError("reach_from has no painted slice")
    lo, hi = int(painted[0]), int(painted[-1])
    decide_in_chunks(slices, lo, hi + 1)
    # both sweeps in step, so that their next slices are scored side by side; a sweep left alone
    # scores one slice ahead, where that needs no encoding (decisions do not depend on the order)
    sweeps = [[hi, 1, seeds[hi]], [lo, -1, seeds[lo]]]      # last decided slice, step, its reach
    while True:
        live = [s for s in sweeps if s[2].any() and 0 <= s[0] + s[1] < slices.n]
        if not live:
            break
        needed = [j + step * (1 + slices.radius) for j, step, _ in live]
        slices.prefetch(needed, ahead=[needed[0] + live[0][1]] if len(live) == 1 else ())
        for sweep in live:
            sweep[0] += sweep[1]
            slices.decide(sweep[0])
            sweep[2] = _connected_next(slices.out.index[sweep[0]], sweep[2])


PREFETCH_CHUNK = 8      # slices whose raw scores are computed together (prefetch), and held at once


def decide_in_chunks(slices: SliceDecisions, start: int, stop: int) -> None:
    """Decide slices start..stop-1, their raw scores computed a chunk at a time (prefetch)."""
    r = slices.radius
    for first in range(start, stop, PREFETCH_CHUNK):
        last = min(stop, first + PREFETCH_CHUNK)
        slices.prefetch(range(first - r, last + r))
        for j in range(first, last):
            slices.decide(j)


def _connected_next(labels: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """The pixels of each label on the next slice (``labels``) whose 2D component touches that
    label's ``reach`` on this slice grown by one pixel (the in-plane part of 26-connectivity).
    Each label is looked at only within its bounding box and a 1-pixel margin (where its reach
    can touch it): a sweep asks this of every slice, and whole 512x512 slices cost 16 ms a slice."""
    following = np.zeros_like(reach)
    boxes = ndimage.find_objects(labels)
    for k in np.unique(reach[reach > 0]):
        if k > len(boxes) or boxes[k - 1] is None:
            continue
        crop = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in boxes[k - 1])
        candidates = labels[crop] == k
        touching = ndimage.binary_dilation(reach[crop] == k, IN_PLANE_8) & candidates
        if not touching.any():
            continue
        components, _ = ndimage.label(candidates, IN_PLANE_8)
        hit = np.unique(components[touching])
        following[crop][np.isin(components, hit[hit > 0])] = k
    return following


class LocationPrior:
    """Where each label was on the template, as evidence for which label a foreground pixel
    is: every label's score is weighted by exp(-d^2 / 2) ** weight, d the pixel's distance from the
    label's mean body-relative position (u, v) in units of the label's spread there (widened by
    location.PATIENT_VARIATION), and rescaled so that the best label keeps the
    best score. So the features alone still decide organ against background (and the confidence
    of a voxel), and location decides between organs the features cannot tell apart (the left and
    the right kidney, spleen against liver tissue)."""

    def __init__(self, model: TrainedModel, prepared: PreparedVolume, stride: int):
        h, w = prepared.features.slice_shape
        self.rows, self.cols = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
        self.prepared, self.weight = prepared, model.config.location_prior
        prepared.body           # the body outline found here, once, not by two slice workers at once
        stats = np.array([model.locations[v] for v in model.label_values], np.float32)   # (K, 4)
        self.mean = torch.from_numpy(stats[:, :2])[:, :, None, None]
        self.spread = torch.from_numpy(np.hypot(stats[:, 2:4], PATIENT_VARIATION))[:, :, None, None]

    def apply(self, scores: torch.Tensor, index: int) -> torch.Tensor:
        zyx = slice_to_volume(index, self.rows.ravel(), self.cols.ravel(), self.prepared.axis)
        uv = torch.from_numpy(self.prepared.body_position(zyx).T.reshape(2, *self.rows.shape).astype(np.float32))
        d2 = (((uv[None] - self.mean) / self.spread) ** 2).sum(1)                # (K, H', W')
        labels = scores[1:]
        weighted = labels * torch.exp(-0.5 * self.weight * d2)
        top = labels.max(0).values
        weighted = weighted * (top / weighted.max(0).values.clamp_min(1e-12))
        return torch.cat([scores[:1], weighted])

