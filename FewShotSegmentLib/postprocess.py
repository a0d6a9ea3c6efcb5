"""3D connected-component clean-up of predicted labels: keep the organ, drop the speckle.

Connectivity is 26 (faces, edges and corners). Predictions are made slice by slice, often on thick
slices (MRI here: 7.7 mm between 1.25 mm pixels), so an organ's cross-sections on neighbouring
slices can touch only along an edge or a corner; 6-connectivity would cut one organ into several
components and "keep the largest" would then delete real parts of it. Speckle that touches the
organ only at a corner is tiny compared with what that split would lose.
"""
from __future__ import annotations

import re

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError

CONNECTIVITY_3D = np.ones((3, 3, 3), bool)
# Organs that come in pairs; a label named only "kidney" or "lungs" is expected to have 2 parts.
PAIRED_ORGAN_WORDS = ("kidney", "lung", "adrenal", "femur", "humerus", "hip", "clavic", "scapula",
                      "iliopsoas", "gluteus", "autochthon", "eye", "parotid", "submandibular",
                      "ovary", "testis", "breast", "tonsil")
SIDE_WORDS = {"left", "right", "l", "r", "lt", "rt"}


def clean_label(mask, seed=None, keep: int = 1, min_voxels: int = 20) -> np.ndarray:
    """Keep the organ's 3D connected component(s) of a boolean (z, y, x) mask.

    Components overlapping `seed` (the painted template RoI, same shape) are kept whatever their
    size: the user painted there. If that gives fewer than `keep` components, the largest other
    components are added until there are `keep`. With seed None (another patient's scan) the
    `keep` largest are kept. Components other than seeded ones smaller than `min_voxels` are
    always dropped.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 3:
        raise InputError(f"clean_label needs a 3D (z, y, x) mask, got shape {mask.shape}")
    if keep < 1:
        raise InputError(f"keep must be at least 1, got {keep}")
    components, count = ndimage.label(mask, structure=CONNECTIVITY_3D)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    kept = set()
    if seed is not None:
        seed = np.asarray(seed, bool)
        if seed.shape != mask.shape:
            raise InputError(f"seed shape {seed.shape} != mask shape {mask.shape}")
        kept = set(np.unique(components[seed]).tolist()) - {0}
    # largest first; ties broken by component number so the result is deterministic
    by_size = sorted(range(1, count + 1), key=lambda c: (-sizes[c], c))
    for component in by_size:
        if len(kept) >= keep or sizes[component] < min_voxels:
            break
        kept.add(component)
    return np.isin(components, sorted(kept))


def clean_label_map(label_map, template_map=None, keep: dict[int, int] | int = 1,
                    min_voxels: int = 20):
    """clean_label for every label of an integer label map (numpy (z, y, x) array or sitk.Image;
    returns the same kind). template_map holds the painted template RoIs (same shape; its label L
    is the seed of label L) or None. keep is one count for all labels or {label: count} (labels
    not in it keep 1). Removed voxels become background (0)."""
    image = label_map if isinstance(label_map, sitk.Image) else None
    values = sitk.GetArrayFromImage(image) if image is not None else np.asarray(label_map)
    if template_map is not None:
        template = (sitk.GetArrayFromImage(template_map) if isinstance(template_map, sitk.Image)
                    else np.asarray(template_map))
        if template.shape != values.shape:
            raise InputError(f"template map shape {template.shape} != label map shape {values.shape}")
    cleaned = np.zeros_like(values)
    for label in np.unique(values):
        if label == 0:
            continue
        count = keep.get(int(label), 1) if isinstance(keep, dict) else keep
        seed = None if template_map is None else template == label
        cleaned[clean_label(values == label, seed, count, min_voxels)] = label
    if image is None:
        return cleaned
    result = sitk.GetImageFromArray(cleaned)
    result.CopyInformation(image)
    return result


def default_keep(name: str) -> int:
    """2 for a label that names both organs of a pair ("kidneys", "lung", "adrenal gland"),
    1 otherwise, including one side of a pair ("kidney_left", "right lung")."""
    words = set(re.split(r"[^a-z]+", name.lower()))
    if words & SIDE_WORDS:
        return 1
    return 2 if any(organ in name.lower() for organ in PAIRED_ORGAN_WORDS) else 1
