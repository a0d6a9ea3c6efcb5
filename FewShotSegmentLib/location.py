"""Where a pixel lies in the body, in terms that transfer between patients.

Foundation-model features say "kidney", not "left kidney", and not "upper abdomen": applied to
another patient, an adapter trained on features alone confuses the two kidneys and takes bowel for
spleen. This module gives every pixel coordinates relative to the patient's body:

- ``u``: right (-1) to left (+1) edge of the body on that axial slice,
- ``v``: anterior (-1) to posterior (+1) edge,
- ``w`` (mode "3d" only): the first to the last slice of the scan (body coverage along the
  superior-inferior axis varies with the scan, so this one is measured separately).

Volumes arrive here in the canonical LPS orientation (pipeline.CANONICAL, chosen from the
image's direction cosines), so array x runs towards the patient's left and y towards posterior:
left and right come from the physical direction, never from array order.

The body is the largest foreground region of each axial slice (body_mask); its bounding box is
smoothed along z so one odd slice does not shift the frame.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu

from .errors import InputError

# how far (in body-relative units) an organ's place differs from one patient to the next, added to
# the template's own spread wherever a position is compared with the template's
PATIENT_VARIATION = 0.15
# each coordinate c in [-1, 1] enters the adapter as c, sin(pi f c), cos(pi f c) for these f: a
# smooth code an MLP can threshold anywhere, and as many channels per coordinate as a few features
FREQUENCIES = (0.5, 1.0)


def channels(mode: str) -> int:
    """Number of location channels appended to each pixel feature in ``mode``."""
    coords = {"off": 0, "inplane": 2, "3d": 3}[mode]
    return coords * (1 + 2 * len(FREQUENCIES))


def body_mask(volume01: np.ndarray) -> np.ndarray:
    """(z, y, x) bool: the patient's body on every axial slice (largest foreground component of
    the slice, closed, holes filled). Foreground is above a quarter of the Otsu threshold of the
    whole volume: Otsu alone splits bright organs from the rest (fat-suppressed MRI has a dark
    body wall), a quarter of it still lies above the air and scanner noise of CT and MRI."""
    if volume01.ndim != 3:
        raise InputError(f"body_mask needs a 3D volume, got shape {volume01.shape}")
    sample = volume01[:, ::4, ::4]
    threshold = 0.25 * threshold_otsu(sample) if np.ptp(sample) > 0 else np.inf
    mask = np.zeros(volume01.shape, bool)
    disc = ndimage.generate_binary_structure(2, 1)
    for z in range(volume01.shape[0]):
        fg = ndimage.binary_opening(volume01[z] > threshold, disc, iterations=2)
        labels, count = ndimage.label(fg)
        if count == 0:
            continue
        largest = 1 + int(np.argmax(ndimage.sum_labels(fg, labels, range(1, count + 1))))
        body = ndimage.binary_closing(labels == largest, disc, iterations=3, border_value=0)
        mask[z] = ndimage.binary_fill_holes(body)
    return mask


class BodyFrame:
    """Body-relative coordinates for any voxel of a canonical (z, y, x) volume."""

    def __init__(self, boxes: np.ndarray, depth: int):
        self.boxes = boxes          # (Z, 4) float: y0, y1, x0, x1 of the body on each axial slice
        self.depth = depth

    @classmethod
    def from_volume(cls, volume01: np.ndarray) -> "BodyFrame":
        # the body's box needs no more than ~256 px a side: a 512x512 CT is searched at every
        # second pixel (its morphology took 3.5 s for 300 slices), boxes given back in pixels
        step = max(1, min(volume01.shape[1:]) // 256)
        mask = body_mask(volume01[:, ::step, ::step])
        z, h, w = mask.shape
        boxes = np.full((z, 4), np.nan)
        for i in range(z):
            rows = np.flatnonzero(mask[i].any(1))
            cols = np.flatnonzero(mask[i].any(0))
            # a sliver (a slice that cut only an arm or the table) is not the body
            if len(rows) > 0.1 * h and len(cols) > 0.1 * w:
                boxes[i] = rows[0] * step, rows[-1] * step + step - 1, cols[0] * step, cols[-1] * step + step - 1
        h, w = volume01.shape[1:]
        boxes = np.minimum(boxes, [h - 1, h - 1, w - 1, w - 1])
        valid = ~np.isnan(boxes[:, 0])
        if not valid.any():
            boxes[:] = 0, h - 1, 0, w - 1        # nothing like a body: the whole image
        else:                                    # slices without a body take their neighbours'
            for c in range(4):
                boxes[:, c] = np.interp(np.arange(z), np.flatnonzero(valid), boxes[valid, c])
            boxes = ndimage.median_filter(boxes, size=(min(5, z), 1), mode="nearest")
        return cls(boxes, z)

    def coordinates(self, zyx: np.ndarray) -> np.ndarray:
        """(n, 3) float (z, y, x) voxel positions -> (n, 3) float32 (u, v, w) in about [-1, 1]."""
        z = np.clip(np.round(zyx[:, 0]).astype(int), 0, self.depth - 1)
        y0, y1, x0, x1 = self.boxes[z].T
        u = 2 * (zyx[:, 2] - x0) / np.maximum(x1 - x0, 1) - 1
        v = 2 * (zyx[:, 1] - y0) / np.maximum(y1 - y0, 1) - 1
        w = 2 * zyx[:, 0] / max(self.depth - 1, 1) - 1
        return np.stack([u, v, w], 1).astype(np.float32)


def encode(coords: np.ndarray, mode: str) -> torch.Tensor:
    """(n, 3) (u, v, w) -> (n, channels(mode)) float32 location channels."""
    used = coords[:, :2] if mode == "inplane" else coords
    parts = [used]
    for f in FREQUENCIES:
        parts += [np.sin(np.pi * f * used), np.cos(np.pi * f * used)]
    return torch.from_numpy(np.concatenate(parts, 1).astype(np.float32))


def slice_to_volume(index, rows: np.ndarray, cols: np.ndarray, axis: str) -> np.ndarray:
    """Pixels (rows, cols) of slice ``index`` (one, or one per pixel) along ``axis`` -> (n, 3)
    canonical (z, y, x)."""
    i = np.broadcast_to(np.asarray(index, dtype=np.float64), (len(rows),))
    r, c = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    if axis == "axial":
        return np.stack([i, r, c], 1)
    if axis == "coronal":          # slices_along(volume, "coronal") is (y, z, x)
        return np.stack([r, i, c], 1)
    return np.stack([r, c, i], 1)  # sagittal: (x, z, y)


class LocatedFeatures:
    """A VolumeFeatures whose pixel features carry location channels after the encoder's: what
    the adapters see when ``PipelineConfig.location`` is on. Everything else is delegated."""

    def __init__(self, features, frame: BodyFrame, axis: str, mode: str):
        if mode not in ("inplane", "3d"):
            raise InputError(f"location must be 'inplane' or '3d' here, got {mode!r}")
        self.base, self.frame_of_body, self.axis, self.mode = features, frame, axis, mode

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __len__(self):
        return len(self.base)

    @property
    def dim(self) -> int:
        return self.base.dim + channels(self.mode)

    def location(self, index: int, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        zyx = slice_to_volume(index, rows, cols, self.axis)
        return encode(self.frame_of_body.coordinates(zyx), self.mode)

    def sample(self, index, rows, cols):
        return torch.cat([self.base.sample(index, rows, cols), self.location(index, rows, cols)], 1)

    def dense(self, index, stride=1):
        h, w = self.base.slice_shape
        rows, cols = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
        feats = self.sample(index, rows.ravel(), cols.ravel())
        return feats.view(rows.shape[0], rows.shape[1], -1)

    def mean_feature(self):
        return torch.cat([self.base.mean_feature(), torch.zeros(channels(self.mode))])
