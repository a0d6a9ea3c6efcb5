"""Where the result is doubtful, and which slice to paint next.

Uncertainty is the adapter's own: 1 - 2 x (margin between the most and second most probable class
of a voxel), after smoothing across slices, clipped to [0, 1] (0: one class leads by 0.5 or more;
1: a tie). A slice is worth painting when many voxels on it are doubtful, weighted by how far it
lies from the slices already painted for the labels concerned (a slice next to a painted one is
already well constrained). Only doubt that a correction can turn into a change of the result
counts: where the label is, or where it is the runner-up near where it is (label_reach);
background far from a label is doubtful wherever the adapter is lukewarm, but the clean-up
removes anything found there. Suggestions are picked greedily: once a slice is suggested it counts
as painted for the next pick, so suggestions spread over the volume.
"""
from __future__ import annotations

import numpy as np
import torch

from .postprocess import values_present

DOUBTFUL = 0.5          # uncertainty above which a voxel counts as doubtful
REACH_SLICES = 3.0      # distance (slices) from a painted slice beyond which a slice counts fully
REACH_MARGIN = 0.1      # a label's result box is widened by this fraction of its size (label_reach)


def uncertainty_from_scores(scores) -> np.ndarray:
    """(C, H, W) class scores (torch or numpy) -> (H, W) uint8 uncertainty, 0..255."""
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if scores.shape[0] < 2:
        return np.zeros(tuple(scores.shape[1:]), np.uint8)
    top2 = scores.topk(2, dim=0).values
    return uncertainty_from_margin((top2[0] - top2[1]).numpy())


def uncertainty_from_margin(margin: np.ndarray) -> np.ndarray:
    """Uncertainty (uint8, 0..255) from the margin between the best and second-best class score:
    255 where they tie, 0 from a margin of 0.5 on."""
    return np.round(np.clip(1.0 - 2.0 * margin, 0.0, 1.0) * 255).astype(np.uint8)


def label_reach(index: np.ndarray, label: int, margin: float = REACH_MARGIN) -> tuple[slice, slice, slice]:
    """The box around where ``label`` is in the (N, H, W) result, widened by ``margin`` of its
    size on every side (at least REACH_SLICES slices along the stack): the only place where a
    correction can change that label, since the clean-up keeps only components at the painting.
    The whole stack when the label is nowhere (then anywhere may be where it was missed)."""
    mask = index == label
    # the box from the mask's projections: np.nonzero's three int64 coordinate arrays of a large
    # label cost 0.2 s a call on a 512x512x300 volume
    on = np.flatnonzero(mask.reshape(len(mask), -1).any(1))
    if len(on) == 0:
        return (slice(None),) * 3
    part = mask[on[0]:on[-1] + 1]
    spans = [(on[0], on[-1])] + [(ax[0], ax[-1]) for ax in (np.flatnonzero(part.any((0, 2))),
                                                              np.flatnonzero(part.any((0, 1))))]
    box = []
    for axis, (first, last) in enumerate(spans):
        lo, hi = int(first), int(last) + 1
        grow = max(margin * (hi - lo), REACH_SLICES if axis == 0 else 1.0)
        box.append(slice(max(0, int(lo - grow)), min(index.shape[axis], int(np.ceil(hi + grow)))))
    return tuple(box)


def doubt_per_slice(uncertainty: np.ndarray, runner_up: np.ndarray, index: np.ndarray, label: int) -> np.ndarray:
    """(N,) number of doubtful voxels on each slice where ``label`` is the winner, or the
    runner-up near where the label is (label_reach): a doubtful background voxel far from every
    component of the label cannot become it."""
    doubtful = uncertainty > DOUBTFUL * 255
    near = np.zeros(index.shape, bool)
    near[label_reach(index, label)] = True
    concerned = (index == label) | ((runner_up == label) & near)
    return (doubtful & concerned).reshape(len(index), -1).sum(1).astype(np.float64)


def suggest_slices(uncertainty: np.ndarray, runner_up: np.ndarray, index: np.ndarray, painted: dict[int, list[int]],
                   count: int = 5) -> list[dict]:
    """Slices to paint next, best first: [{"index", "score", "labels"}], on the (N, H, W) stacks
    of the propagation axis. ``painted``: {label: slices where it is painted} (labels with no entry
    count as painted nowhere). A slice may serve several labels; its score is the sum of theirs."""
    n = len(index)
    labels = sorted(set(painted) | (set(values_present(index).tolist()) - {0}))
    doubt = {k: doubt_per_slice(uncertainty, runner_up, index, k) for k in labels}
    taken = {k: list(painted.get(k, [])) for k in labels}
    picks = []
    positions = np.arange(n)
    for _ in range(min(count, n)):
        total = np.zeros(n)
        parts = {}
        for k in labels:
            if taken[k]:
                distance = np.min(np.abs(positions[:, None] - np.asarray(taken[k])[None]), axis=1)
                weight = np.minimum(1.0, distance / REACH_SLICES)
            else:
                weight = np.ones(n)
            parts[k] = doubt[k] * weight
            total += parts[k]
        for p in picks:
            total[p["index"]] = -1
        best = int(np.argmax(total))
        if total[best] <= 0:
            break
        served = [k for k in labels if parts[k][best] > 0]
        picks.append({"index": best, "score": float(total[best]), "labels": served})
        for k in labels:
            taken[k].append(best)
    return picks
