"""Overlap scores between a predicted and a reference segmentation, and the plain-text table the
benchmarks print them in."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError


def dice(pred, ref) -> float:
    """Dice = 2|P∩R| / (|P|+|R|) of two boolean arrays of the same shape.

    Returns nan when both are empty: there is nothing to score, and 1.0 would inflate averages
    over labels that are absent from a scan. One empty and one not gives 0.0.
    """
    pred, ref = _boolean_pair(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def iou(pred, ref) -> float:
    """Intersection over union (Jaccard) of two boolean arrays; nan when both are empty (see dice)."""
    pred, ref = _boolean_pair(pred, ref)
    union = int(np.logical_or(pred, ref).sum())
    if union == 0:
        return math.nan
    return int(np.logical_and(pred, ref).sum()) / union


def per_label_scores(pred_labels, ref_labels, labels: Iterable[int]) -> dict[int, dict]:
    """{label: {"dice", "iou", "pred_voxels", "ref_voxels"}} for each label value of two integer
    label arrays of the same shape (a label absent from both scores nan)."""
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise InputError(f"prediction shape {pred_labels.shape} != reference shape {ref_labels.shape}")
    scores = {}
    for label in labels:
        pred, ref = pred_labels == label, ref_labels == label
        scores[int(label)] = {"dice": dice(pred, ref), "iou": iou(pred, ref),
                              "pred_voxels": int(pred.sum()), "ref_voxels": int(ref.sum())}
    return scores


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Rows (dicts) as an aligned plain-text table with one line per row; numbers right-aligned,
    floats with 3 decimals, missing values blank."""
    def text(value) -> str:
        if value is None:
            return ""
        if isinstance(value, (float, np.floating)):
            return "nan" if math.isnan(value) else f"{value:.3f}"
        return str(value)

    cells = [[text(row.get(column)) for column in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float, np.number)) or row.get(c) is None for row in rows)
               for c in columns]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def line(values) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, right in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule] + [line(values) for values in cells])


def _boolean_pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def surface_distances(pred, ref, spacing=(1.0, 1.0, 1.0)) -> dict:
    """{"hd95", "assd"} in mm between the surfaces of two boolean 3D masks (MONAI's convention:
    HD95 = the larger of the two directed 95th percentiles; ASSD = mean over both surfaces'
    points). nan when both are empty, inf when only one is. Surfaces are the mask voxels that
    touch the outside (face connectivity); distances come from scipy's exact Euclidean distance
    transform with the voxel spacing."""
    from scipy import ndimage

    pred, ref = _boolean_pair(pred, ref)
    if not pred.any() and not ref.any():
        return {"hd95": math.nan, "assd": math.nan}
    if not pred.any() or not ref.any():
        return {"hd95": math.inf, "assd": math.inf}

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, border_value=0)

    # crop to the union's bounding box (plus a voxel) so large volumes stay cheap
    box = _union_box(pred, ref)
    pred, ref = pred[box], ref[box]
    sp, sr = surface(pred), surface(ref)
    to_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    return {"hd95": float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95))),
            "assd": float(np.concatenate([to_ref, to_pred]).mean())}


def _union_box(a, b):
    nonzero = np.nonzero(a | b)
    return tuple(slice(max(0, int(idx.min()) - 1), int(idx.max()) + 2) for idx in nonzero)
