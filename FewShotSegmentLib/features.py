"""Encoder features of every slice of a volume along one axis, and lazy pixel-level sampling.

Only the backbone's low-resolution grids are kept (float16); pixel features are bilinearly
interpolated on demand for the pixels asked for, or for one slice at a time.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Backbone, Encoded
from .errors import Cancelled

AXIS_INDEX = {"axial": 0, "coronal": 1, "sagittal": 2}

Progress = Callable[[float, str, str], None]


def slices_along(volume: np.ndarray, axis: str) -> np.ndarray:
    """(z, y, x) volume -> (N, H, W) stack of 2D slices along the named axis (a view)."""
    return np.moveaxis(volume, AXIS_INDEX[axis], 0)


def volume_from_slices(stack: np.ndarray, axis: str) -> np.ndarray:
    """The inverse of slices_along: (N, H, W) slices along the named axis -> (z, y, x) (a view)."""
    return np.moveaxis(stack, 0, AXIS_INDEX[axis])


class VolumeFeatures:
    """Feature grids of all N slices along one axis of a normalized volume."""

    def __init__(self, encoded: Encoded, slice_shape: tuple[int, int]):
        self.features = encoded.features          # (N, C, h, w) float16
        self.sam_embeddings = encoded.sam_embeddings
        self.scale = encoded.scale
        self.frame = encoded.frame
        self.slice_shape = slice_shape

    def __len__(self):
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def mean_feature(self) -> torch.Tensor:
        """(C,) mean feature of the whole volume, computed once (the basic adapter's centre:
        recomputing it per slice made CT propagation 8x slower)."""
        if getattr(self, "_mean", None) is None:
            self._mean = self.features.float().mean(dim=(0, 2, 3))
        return self._mean

    def _grid(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        fh, fw = self.frame
        gy = (np.asarray(rows, dtype=np.float32) + 0.5) * self.scale / fh * 2 - 1
        gx = (np.asarray(cols, dtype=np.float32) + 0.5) * self.scale / fw * 2 - 1
        return torch.from_numpy(np.stack([gx, gy], -1)).view(1, 1, -1, 2)

    def sample(self, index: int, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Pixel features (n, C) float32 of slice ``index`` at pixel coordinates rows/cols."""
        fmap = self.features[index:index + 1].float()
        out = F.grid_sample(fmap, self._grid(rows, cols), mode="bilinear", align_corners=False)
        return out[0, :, 0].T.contiguous()

    def dense(self, index: int, stride: int = 1) -> torch.Tensor:
        """Pixel features (H', W', C) of one slice, on every ``stride``-th pixel."""
        h, w = self.slice_shape
        rows, cols = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
        feats = self.sample(index, rows.ravel(), cols.ravel())
        return feats.view(rows.shape[0], rows.shape[1], -1)


def _cache_key(slices: np.ndarray, backbone: Backbone) -> str:
    digest = hashlib.sha1()
    digest.update(backbone.id.encode())
    digest.update(str(slices.shape).encode())
    digest.update(np.ascontiguousarray(slices).tobytes())
    return digest.hexdigest()[:24]


def encode_volume(slices: np.ndarray, backbone: Backbone, batch_size: int = 1, cache_dir: str | Path = "",
                  progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                  progress_range: tuple[float, float] = (0.0, 1.0)) -> VolumeFeatures:
    """Encode every slice of ``slices`` (N, H, W) in [0, 1]. With ``cache_dir`` the result is stored
    under a hash of the pixel data and the backbone id, so the same volume is encoded once."""
    n, h, w = slices.shape
    cache_file = None
    if cache_dir:
        cache_file = Path(cache_dir) / f"{_cache_key(slices, backbone)}.pt"
        if cache_file.is_file():
            try:
                data = torch.load(cache_file, map_location="cpu", weights_only=True)
                encoded = Encoded(features=data["features"], scale=float(data["scale"]),
                                  frame=tuple(int(v) for v in data["frame"]), sam_embeddings=data.get("sam"))
                if progress:
                    progress(progress_range[1], "encode", f"features of {n} slices from cache")
                return VolumeFeatures(encoded, (h, w))
            except Exception:
                cache_file.unlink(missing_ok=True)  # a corrupt cache entry is recomputed, never trusted
    parts, sams = [], []
    encoded = None
    lo, hi = progress_range
    for start in range(0, n, batch_size):
        if cancel and cancel():
            raise Cancelled("cancelled while encoding")
        encoded = backbone.encode(slices[start:start + batch_size])
        parts.append(encoded.features)
        if encoded.sam_embeddings is not None:
            sams.append(encoded.sam_embeddings)
        if progress:
            done = min(n, start + batch_size)
            progress(lo + (hi - lo) * done / n, "encode", f"encoded slice {done}/{n}")
    result = Encoded(features=torch.cat(parts), scale=encoded.scale, frame=encoded.frame,
                     sam_embeddings=torch.cat(sams) if sams else None)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        payload = {"features": result.features, "scale": torch.tensor(result.scale),
                   "frame": torch.tensor(result.frame)}
        if result.sam_embeddings is not None:
            payload["sam"] = result.sam_embeddings
        torch.save(payload, tmp)
        tmp.replace(cache_file)
    return VolumeFeatures(result, (h, w))
