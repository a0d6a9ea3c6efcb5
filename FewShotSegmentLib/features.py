"""Encoder features of every slice of a volume along one axis, and lazy pixel-level sampling.

Only the backbone's low-resolution grids are kept (float16); pixel features are bilinearly
interpolated on demand for the pixels asked for, or for one slice at a time.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import runtime
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


class EmbeddingsOnDemand:
    """``embeddings[i]`` of one slice, made from its features when asked (the last one kept):
    what refinement reads instead of a stored (N, 256, 64, 64) array."""

    def __init__(self, features: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]):
        self.features, self.make = features, make
        self._last: tuple[int, torch.Tensor] | None = None

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if self._last is None or self._last[0] != index:
            self._last = (index, self.make(self.features[index:index + 1])[0])
        return self._last[1]


class VolumeFeatures:
    """Feature grids of all N slices along one axis of a normalized volume."""

    def __init__(self, encoded: Encoded, slice_shape: tuple[int, int]):
        self.features = encoded.features          # (N, C, h, w) float16
        self.sam_embeddings = encoded.sam_embeddings
        if self.sam_embeddings is None and encoded.sam_from_features is not None:
            self.sam_embeddings = EmbeddingsOnDemand(self.features, encoded.sam_from_features)
        self.scale = encoded.scale
        self.frame = encoded.frame
        self.slice_shape = slice_shape
        self._last_float: tuple[int, torch.Tensor] | None = None

    def __len__(self):
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def mean_feature(self) -> torch.Tensor:
        """(C,) mean feature of the whole volume, computed once (the basic adapter's centre:
        recomputing it per slice made CT propagation 8x slower)."""
        if getattr(self, "_mean", None) is None:
            # slice by slice: a float32 copy of a 300-slice grid at once would be 1.6 GB
            total = sum(self.features[i].float().sum(dim=(1, 2)) for i in range(len(self)))
            self._mean = total / (len(self) * self.features.shape[2] * self.features.shape[3])
        return self._mean

    def _grid(self, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        fh, fw = self.frame
        gy = (np.asarray(rows, dtype=np.float32) + 0.5) * self.scale / fh * 2 - 1
        gx = (np.asarray(cols, dtype=np.float32) + 0.5) * self.scale / fw * 2 - 1
        return torch.from_numpy(np.stack([gx, gy], -1)).view(1, 1, -1, 2)

    def _float_slice(self, index: int) -> torch.Tensor:
        """(1, C, h, w) float32 grid of one slice; the last one is kept, as scoring samples a
        slice in several chunks."""
        if self._last_float is None or self._last_float[0] != index:
            self._last_float = (index, self.features[index:index + 1].float())
        return self._last_float[1]

    def sample(self, index: int, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Pixel features (n, C) float32 of slice ``index`` at pixel coordinates rows/cols."""
        fmap = self._float_slice(index)
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
    digest.update(getattr(backbone, "cache_tag", backbone.id).encode())
    digest.update(str(slices.shape).encode())
    digest.update(np.ascontiguousarray(slices).tobytes())
    return digest.hexdigest()[:24]


class _FeatureStore:
    """Where the encoded grids of a volume go: with a cache folder, raw float16 files mapped into
    memory (so a 1000-slice volume needs page cache, not resident memory, and a cache hit reads
    nothing up front); without one, plain tensors. Filled batch by batch; ``meta.json`` is written
    last, so an interrupted encoding never looks complete."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.arrays: dict[str, torch.Tensor] = {}

    def allocate(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        count = int(np.prod(shape))
        if self.folder is None:
            tensor = torch.empty(shape, dtype=torch.float16)
        else:
            path = self.folder / f"{name}.f16"
            # a new file, never one truncated in place: another job may still map the old one
            path.unlink(missing_ok=True)
            with open(path, "wb") as handle:     # sized up front; pages are written as encoded
                handle.truncate(count * 2)
            tensor = torch.from_file(str(path), shared=True, size=count, dtype=torch.float16).view(shape)
        self.arrays[name] = tensor
        return tensor

    def finish(self, scale: float, frame: tuple[int, int]) -> None:
        if self.folder is None:
            return
        meta = {"scale": scale, "frame": list(frame), "arrays": {k: list(v.shape) for k, v in self.arrays.items()}}
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.folder / "meta.json")

    @staticmethod
    def load(folder: Path) -> Encoded:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {}
        for name, shape in meta["arrays"].items():
            path = folder / f"{name}.f16"
            count = int(np.prod(shape))
            if path.stat().st_size != count * 2:
                raise ValueError(f"{path} has the wrong size")
            # MAP_PRIVATE: read-only use, and a stray write could never reach the cache file
            arrays[name] = torch.from_file(str(path), shared=False, size=count, dtype=torch.float16).view(shape)
        return Encoded(features=arrays["features"], scale=float(meta["scale"]),
                       frame=tuple(int(v) for v in meta["frame"]), sam_embeddings=arrays.get("sam"))  # older entries have one


def encode_volume(slices: np.ndarray, backbone: Backbone, batch_size: int = 1, cache_dir: str | Path = "",
                  progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                  progress_range: tuple[float, float] = (0.0, 1.0)) -> VolumeFeatures:
    """Encode every slice of ``slices`` (N, H, W) in [0, 1]. With ``cache_dir`` the result is stored
    under a hash of the pixel data and the backbone's cache tag (model and precision), so the same
    volume is encoded once, and is memory-mapped from there."""
    n, h, w = slices.shape
    folder = None
    if cache_dir:
        folder = Path(cache_dir) / _cache_key(slices, backbone)
        if (folder / "meta.json").is_file():
            try:
                encoded = _FeatureStore.load(folder)
                if backbone.provides_sam_embeddings and encoded.sam_embeddings is None:
                    encoded.sam_from_features = backbone.sam_from_features
                if len(encoded.features) == n:
                    if progress:
                        progress(progress_range[1], "encode", f"features of {n} slices from cache")
                    return VolumeFeatures(encoded, (h, w))
            except (OSError, ValueError, KeyError, RuntimeError):
                pass
            shutil.rmtree(folder, ignore_errors=True)  # a corrupt cache entry is recomputed, never trusted
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)
    store = _FeatureStore(folder)
    features = encoded = None
    lo, hi = progress_range
    try:
        with runtime.encoder_memory():     # see runtime.py
            for start in range(0, n, batch_size):
                if cancel and cancel():
                    raise Cancelled("cancelled while encoding")
                batch = slices[start:start + batch_size]
                count = len(batch)
                if count < batch_size and start > 0:
                    # the last batch is padded to the others' size: a compiled encoder sees one shape
                    batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
                encoded = backbone.encode(batch)
                if features is None:
                    features = store.allocate("features", (n,) + tuple(encoded.features.shape[1:]))
                features[start:start + count] = encoded.features[:count]
                if progress:
                    done = min(n, start + batch_size)
                    progress(lo + (hi - lo) * done / n, "encode", f"encoded slice {done}/{n}")
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    store.finish(encoded.scale, encoded.frame)
    # SAM embeddings: the features themselves (LiteMedSAM's neck layer), or made from them
    return VolumeFeatures(Encoded(features=features, scale=encoded.scale, frame=encoded.frame,
                                  sam_embeddings=features if encoded.sam_embeddings is encoded.features else None,
                                  sam_from_features=encoded.sam_from_features), (h, w))
