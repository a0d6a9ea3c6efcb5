"""One representative point per segmented region (3D landmarks, per-slice 2D points), and the
localization score that asks whether a prediction found the organ in the right place.

Arrays are (z, y, x); SimpleITK indices are (x, y, z).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .location import PATIENT_VARIATION
from .postprocess import components_in_box, values_present

CONNECTIVITY_3D = np.ones((3, 3, 3), bool)
CONNECTIVITY_2D = np.ones((3, 3), bool)


def region_point(mask3d, spacing_zyx=None) -> tuple[float, float, float]:
    """(z, y, x) point that represents a region: the centroid of the largest connected component,
    moved to the nearest voxel of that component when the centroid falls outside it (a C-shaped
    or hollow organ). spacing_zyx, if given, makes "nearest" physical rather than in voxels."""
    mask = np.asarray(mask3d, bool)
    if mask.ndim != 3:
        raise InputError(f"region_point needs a 3D (z, y, x) mask, got shape {mask.shape}")
    return _representative_point(mask, CONNECTIVITY_3D, spacing_zyx)


def slice_points(mask3d, axis: int = 0) -> dict[int, tuple[float, float]]:
    """{slice index: (row, col)} representative 2D point of every slice along axis that has any
    voxel; rows and columns are those of np.take(mask3d, index, axis)."""
    mask = np.asarray(mask3d, bool)
    if mask.ndim != 3:
        raise InputError(f"slice_points needs a 3D (z, y, x) mask, got shape {mask.shape}")
    other_axes = tuple(a for a in range(3) if a != axis % 3)
    occupied = np.flatnonzero(mask.any(axis=other_axes))
    return {int(i): _representative_point(np.take(mask, i, axis=axis), CONNECTIVITY_2D, None)
            for i in occupied}


def landmarks_from_label_map(label_map: sitk.Image, labels: dict[int, dict]) -> list[dict]:
    """One landmark per label of `labels` ({value: {"name": ...}}) present in label_map:
    {"label_value", "label" (name), "index" (x, y, z continuous ITK index), "position" (LPS mm)}.
    Labels of `labels` absent from the map get no landmark."""
    values = sitk.GetArrayViewFromImage(label_map)
    spacing_zyx = label_map.GetSpacing()[::-1]
    present = set(values_present(values).tolist())
    landmarks = []
    for value in sorted(int(v) for v in labels):
        if value == 0 or value not in present:
            continue
        z, y, x = region_point(values == value, spacing_zyx)
        index = (x, y, z)
        landmarks.append({
            "label_value": value,
            "label": str(labels[value].get("name", f"label {value}")),
            "index": index,
            "position": tuple(label_map.TransformContinuousIndexToPhysicalPoint(index)),
        })
    return landmarks


def localization_scores(pred_mask, ref_mask, spacing_zyx, axis: int = 0, tolerance_px: float = 10) -> dict:
    """Did the prediction find the organ where it is?

    slice_accuracy: fraction of the reference's slices (along axis) whose predicted 2D point lies
    within tolerance_px pixels of the reference 2D point; a slice with no prediction is a miss.
    distance_mm: distance between the 3D region points of prediction and reference (nan if
    either is empty). n_slices: number of reference slices scored.
    """
    pred, ref = np.asarray(pred_mask, bool), np.asarray(ref_mask, bool)
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    ref_points = slice_points(ref, axis)
    pred_points = slice_points(pred, axis)
    hits = sum(1 for index, point in ref_points.items()
               if index in pred_points and math.dist(point, pred_points[index]) <= tolerance_px)
    spacing = np.asarray(spacing_zyx, float)
    if pred.any() and ref.any():
        gap = (np.array(region_point(pred, spacing)) - np.array(region_point(ref, spacing))) * spacing
        distance = float(np.linalg.norm(gap))
    else:
        distance = math.nan
    return {"slice_accuracy": hits / len(ref_points) if ref_points else math.nan,
            "distance_mm": distance, "n_slices": len(ref_points)}


def _representative_point(mask: np.ndarray, structure: np.ndarray, spacing) -> tuple[float, ...]:
    components, count, box = components_in_box(mask, structure)
    if count == 0:
        raise InputError("cannot place a point in an empty mask")
    offset = np.array([b.start for b in box], float)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    region = components == largest
    # the centroid from the region's profiles along each axis: no (n, 3) coordinate list, and no
    # float64 copy of the box (ndimage.center_of_mass makes one per axis)
    centroid = np.array([np.dot(region.sum(tuple(a for a in range(region.ndim) if a != axis)),
                                np.arange(region.shape[axis])) for axis in range(region.ndim)], float) / sizes[largest]
    if components[tuple(np.round(centroid).astype(int))] == largest:
        return tuple(float(c) for c in centroid + offset)
    coordinates = np.argwhere(region).astype(float)
    scale = np.ones(mask.ndim) if spacing is None else np.asarray(spacing, float)
    nearest = coordinates[np.argmin((((coordinates - centroid) * scale) ** 2).sum(axis=1))]
    return tuple(float(c) for c in nearest + offset)


# A label painted no larger than this (median cross-section on its painted slices) is a landmark:
# a few strokes that mark a point. A disc of ~11 mm radius; organs are painted far larger.
LANDMARK_AREA_MM2 = 400.0
# How much a feature cell's cosine to the painted RoI's mean feature counts against its distance
# from where the template had the RoI in the body: score = cosine - WEIGHT * d^2 / 2, d in units of
# the template's spread widened by the variation between patients (location.PATIENT_VARIATION).
# Measured on the five development patients (benchmarks/results/cross_patient.md, landmarks):
# features alone 0.33 within 10 px, with the location term 0.45, flat for weights 0.02-0.09.
LOCATION_WEIGHT = 0.05


def match_point(features, descriptor: torch.Tensor, body_position, expected,
                area_px: float) -> tuple[int, float, float]:
    """The point of a volume most like a painted landmark: each slice's encoder feature cells
    (``features``: a features.VolumeFeatures) scored by cosine to ``descriptor`` (the RoI's mean
    feature) less the location term (LOCATION_WEIGHT) from ``expected`` ([mean u, mean v, spread
    u, spread v] body-relative, or None) via ``body_position`` ((n, 3) (slice, row, col) -> (n, 2)
    (u, v)); returns the median (slice, row, col) of the best cells that together cover
    ``area_px`` (the painted RoI's size), so one noisy cell does not decide."""
    n, (h, w) = len(features), features.features.shape[2:]
    descriptor = descriptor.float()
    unit = descriptor / descriptor.norm().clamp_min(1e-12)
    sims = torch.empty(n, h, w)
    for i in range(n):       # a slice at a time (encoded, or interpolated, when first read): no float copy of the volume
        cells = features.slice_grid(i)[0].float()
        sims[i] = torch.einsum("chw,c->hw", cells, unit) / cells.norm(dim=0).clamp_min(1e-12)
    # a cell spans frame / (cells * scale) image pixels (the frame may pad the slice)
    step = (features.frame[0] / (h * features.scale), features.frame[1] / (w * features.scale))
    return _best_cells(sims, body_position, expected, area_px, step, features.slice_shape)


def _best_cells(sims, body_position, expected, area_px, step, slice_shape):
    n, h, w = sims.shape
    height, width = slice_shape
    rows = (np.arange(h) + 0.5) * step[0] - 0.5      # cell centres in image pixels
    cols = (np.arange(w) + 0.5) * step[1] - 0.5
    zz, rr, cc = np.meshgrid(np.arange(n), rows, cols, indexing="ij")
    score = sims.numpy().astype(np.float64)
    if expected is not None:
        uv = body_position(np.stack([zz.ravel(), rr.ravel(), cc.ravel()], 1).astype(np.float64))
        spread = np.hypot(np.asarray(expected[2:4], float), PATIENT_VARIATION)
        d2 = ((uv[:, 0] - expected[0]) / spread[0]) ** 2 + ((uv[:, 1] - expected[1]) / spread[1]) ** 2
        score = score - LOCATION_WEIGHT * 0.5 * d2.reshape(score.shape)
    inside = (rr <= height - 1) & (cc <= width - 1)          # cells of the padding are not the slice
    score = np.where(inside, score, -np.inf)
    count = int(max(1, min(inside.sum(), round(area_px / (step[0] * step[1])))))
    best = np.argpartition(score.ravel(), -count)[-count:]
    return (int(np.median(zz.ravel()[best])), float(np.median(rr.ravel()[best])),
            float(np.median(cc.ravel()[best])))
