"""Encoder features of every slice of a volume along one axis, and lazy pixel-level sampling.

Only the backbone's low-resolution grids are kept (float16); pixel features are bilinearly
interpolated on demand for the pixels asked for, or for one slice at a time.

A volume may also be encoded on demand (``encode_volume(on_demand=True)``): a slice is encoded,
a batch-sized block of slices at a time, when something first reads its features. The painted
volume's propagation reaches only the slices its labels can connect to (propagation.py), so on a
512x512x300 CT with four organs painted on one slice 169 slices are scored and the other 131 are
never encoded.

On volumes whose slices lie much closer than the feature grid's cell is wide (thin-slice CT), only
every ``step``-th slice is encoded (encoding_step) and the slices between read their neighbours'
grids linearly interpolated, as pixels already read the grid interpolated in-plane.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
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
    what refinement reads instead of a stored (N, 256, 64, 64) array. ``make`` None: the
    features are the embeddings."""

    def __init__(self, features: "VolumeFeatures", make: Callable[[torch.Tensor], torch.Tensor] | None):
        self.features, self.make = features, make
        self._last: tuple[int, int, torch.Tensor] | None = None   # index, features.version

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if self.make is None:
            return self.features.slice_grid(index)[0]
        # the grid only on a miss: off the lattice it is an interpolation, not a view
        # (read once: slice workers of a refinement ask from several threads)
        last = self._last
        if last is None or last[:2] != (index, self.features.version):
            last = self._last = (index, self.features.version, self.make(self.features.slice_grid(index))[0])
        return last[2]


class SliceEncoder:
    """Encodes the slices of a volume that have no features yet, one block of the encoding
    lattice at a time (VolumeFeatures: every ``step``-th slice and the last; block b holds
    lattice[b * batch, (b + 1) * batch), whole: a compiled encoder sees one batch shape, and a
    block is never left half encoded), and notes them in the cache entry. Slices off the lattice
    that must be exact (the painted ones) are encoded in batches of their own."""

    def __init__(self, slices: np.ndarray, backbone: Backbone, batch_size: int, store: "_FeatureStore",
                 missing: np.ndarray, lattice: np.ndarray | None = None):
        self.slices, self.backbone, self.batch_size, self.store = slices, backbone, max(1, batch_size), store
        self.missing = missing          # (N,) bool: slices not encoded yet
        self.lattice = np.arange(len(missing)) if lattice is None else np.asarray(lattice, dtype=np.int64)
        self._position = np.full(len(missing), -1, dtype=np.int64)     # a slice's place on the lattice
        self._position[self.lattice] = np.arange(len(self.lattice))
        self.seconds = 0.0              # spent encoding on demand

    def fill(self, features: torch.Tensor, indices, progress: Callable[[int, int, int], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> None:
        """Encode the blocks holding ``indices`` that are still missing. ``progress(done, blocks,
        last slice)`` after each block; ``cancel()`` before each (True raises Cancelled)."""
        wanted = np.unique(np.asarray(indices, dtype=np.int64).ravel())
        wanted = wanted[self.missing[wanted]]
        if not len(wanted):
            return
        start = time.perf_counter()
        size = self.batch_size
        on = self._position[wanted] >= 0
        groups = [self.lattice[b * size:(b + 1) * size] for b in np.unique(self._position[wanted[on]] // size)]
        off = wanted[~on]
        groups += [off[k:k + size] for k in range(0, len(off), size)]
        # the encoder's own settings, whatever the caller runs under (a scoring loop's autocast
        # would make the compiled graph recompile)
        with runtime.encoder_memory(), torch.autocast("cpu", enabled=False):
            for done, group in enumerate(groups, start=1):
                if cancel and cancel():
                    raise Cancelled("cancelled while encoding")
                encoded = self.backbone.encode(_padded(self.slices[group], size))
                todo = np.flatnonzero(self.missing[group])
                features[torch.from_numpy(group[todo])] = encoded.features[torch.from_numpy(todo)]
                self.missing[group[todo]] = False
                if progress:
                    progress(done, len(groups), int(group[-1]) + 1)
        self.store.note_missing(self.missing)   # once a call: the entry then says what it holds
        self.seconds += time.perf_counter() - start


MAX_STEP = 4     # encoding_step: at most every 4th slice is encoded


def encoding_step(cell_mm: float, slice_mm: float, asked: int = 0) -> int:
    """Every how many slices the encoder runs: ``asked`` when it is 1 or more; 0 (auto): as many
    as keep the encoded slices at most half a feature cell apart (``cell_mm``: the grid's cell
    in-plane, Backbone.cell_pixels times the pixel size), at most MAX_STEP. The features are
    interpolated in-plane across whole cells already; across slices half a cell apart they change
    as little (LiteMedSAM on a 512x512 CT of 0.7 mm pixels: 5.7 mm cells, so slices of 1.1 mm
    are encoded every second one, slices of 2.5 mm or more all)."""
    if asked >= 1:
        return int(asked)
    if cell_mm <= 0 or slice_mm <= 0:
        return 1
    return int(max(1, min(MAX_STEP, cell_mm // (2 * slice_mm))))


def encoding_lattice(n: int, step: int) -> np.ndarray:
    """The slices encoded with ``step``: every step-th one and the last."""
    return np.unique(np.r_[np.arange(0, n, max(1, step)), n - 1]).astype(np.int64)


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    """A short batch padded to ``size`` with its last slice: a compiled encoder sees one shape."""
    if len(batch) >= size:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


class VolumeFeatures:
    """Feature grids of all N slices along one axis of a normalized volume.

    With ``step`` > 1 only the lattice (every step-th slice and the last; encoding_step) and the
    slices asked to be exact (``keep_exact``: the painted ones) are encoded; a slice between
    two lattice slices reads their grids linearly interpolated, so everything downstream (scoring,
    refinement's SAM embeddings) reads every slice as before. Which slices are exact never
    depends on what a cache entry happens to hold: the same job gives the same result."""

    def __init__(self, encoded: Encoded, slice_shape: tuple[int, int], encoder: SliceEncoder | None = None,
                 step: int = 1):
        self.features = encoded.features          # (N, C, h, w) float16; read through slice_grid / grid
        self.encoder = encoder                    # fills the slices not encoded yet; None: all are
        self.sam_embeddings = encoded.sam_embeddings
        if encoded.sam_embeddings is encoded.features:
            self.sam_embeddings = EmbeddingsOnDemand(self, None)
        elif self.sam_embeddings is None and encoded.sam_from_features is not None:
            self.sam_embeddings = EmbeddingsOnDemand(self, encoded.sam_from_features)
        self.scale = encoded.scale
        self.frame = encoded.frame
        self.slice_shape = slice_shape
        self.step = max(1, int(step))
        n = len(self)
        self._exact = np.zeros(n, bool)
        self._exact[encoding_lattice(n, self.step)] = True     # the lattice, and keep_exact's slices
        self._lattice = self._exact.copy()
        self.version = 0                          # changes when a slice's grid may change (keep_exact)
        self._last_float: tuple[int, int, torch.Tensor] | None = None

    def keep_exact(self, indices) -> None:
        """Encode these slices (the painted ones: training reads their pixels) even when they lie
        off the lattice; the slices an earlier call named are interpolated again."""
        exact = self._lattice.copy()
        exact[np.asarray(indices, dtype=np.int64)] = True
        if not np.array_equal(exact, self._exact):
            self._exact = exact
            self.version += 1
        self.ensure(indices)

    def sources(self, indices) -> np.ndarray:
        """The encoded slices the grids of these slices are made of (sorted, unique)."""
        index = np.asarray(indices, dtype=np.int64).ravel()
        if self.step == 1:
            return np.unique(index)
        exact = self._exact[index]
        below, above = self._lattice_around(index)
        return np.unique(np.concatenate([index[exact], below[~exact], above[~exact]]))

    def _lattice_around(self, index):
        """The lattice slices at or below and above ``index`` (an int or an array of them)."""
        below = index - index % self.step
        return below, np.minimum(below + self.step, len(self) - 1)

    def ensure(self, indices) -> None:
        """Encode the slices these slices' grids need now if they are not yet (on-demand
        volumes; a no-op otherwise)."""
        if self.encoder is not None:
            self.encoder.fill(self.features, self.sources(indices))

    @property
    def encoded(self) -> np.ndarray:
        """(N,) bool: the slices whose features exist."""
        return np.ones(len(self), bool) if self.encoder is None else ~self.encoder.missing

    @property
    def encoder_seconds(self) -> float:
        """Seconds spent encoding on demand so far."""
        return 0.0 if self.encoder is None else self.encoder.seconds

    def slice_grid(self, index: int) -> torch.Tensor:
        """(1, C, h, w) float16 grid of one slice (encoded now if it is not yet; off the lattice,
        its neighbours' on it interpolated)."""
        self.ensure([index])
        if self._exact[index]:
            return self.features[index:index + 1]
        below, above = (int(v) for v in self._lattice_around(index))
        weight = (index - below) / (above - below)
        return torch.lerp(self.features[below:below + 1].float(), self.features[above:above + 1].float(),
                          weight).half()

    @property
    def grid(self) -> torch.Tensor:
        """(N, C, h, w) float16 grids of every slice (all encoded first; a copy with step > 1)."""
        self.ensure(np.arange(len(self)))
        if self.step == 1:
            return self.features
        return torch.cat([self.slice_grid(i) for i in range(len(self))])

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
            total = sum(self.slice_grid(i)[0].float().sum(dim=(1, 2)) for i in range(len(self)))
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
        last = self._last_float        # read once: other threads may replace it
        if last is None or last[:2] != (index, self.version):
            last = self._last_float = (index, self.version, self.slice_grid(index).float())
        return last[2]

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
    nothing up front); without one, plain tensors. ``meta.json`` is written once the grids it
    describes are in the file: when every slice is encoded, or (on demand) after each batch of
    slices, with the slices still missing; an interrupted encoding never looks complete."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.arrays: dict[str, torch.Tensor] = {}
        self.scale, self.frame = 1.0, (0, 0)

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

    def finish(self, scale: float, frame: tuple[int, int], missing: np.ndarray | None = None) -> None:
        self.scale, self.frame = scale, tuple(frame)
        self.note_missing(missing)

    def note_missing(self, missing: np.ndarray | None) -> None:
        if self.folder is None:
            return
        meta = {"scale": self.scale, "frame": list(self.frame),
                "arrays": {k: list(v.shape) for k, v in self.arrays.items()}}
        if missing is not None and missing.any():
            meta["missing"] = np.flatnonzero(missing).tolist()
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        tmp.replace(self.folder / "meta.json")

    @classmethod
    def load(cls, folder: Path) -> tuple[Encoded, np.ndarray, "_FeatureStore"]:
        """The entry's grids, the slices it still lacks ((N,) bool) and a store to note more in."""
        meta = json.loads((folder / "meta.json").read_text())
        store = cls(folder)
        store.scale, store.frame = float(meta["scale"]), tuple(int(v) for v in meta["frame"])
        shapes = meta["arrays"]
        missing = np.zeros(shapes["features"][0], bool)
        missing[np.asarray(meta.get("missing", []), dtype=np.int64)] = True
        for name, shape in shapes.items():
            path = folder / f"{name}.f16"
            count = int(np.prod(shape))
            if path.stat().st_size != count * 2:
                raise ValueError(f"{path} has the wrong size")
            # complete: MAP_PRIVATE, read-only use, and a stray write could never reach the cache
            # file; partial: shared, so what is encoded now is kept for the next job
            store.arrays[name] = torch.from_file(str(path), shared=bool(missing.any()), size=count,
                                                 dtype=torch.float16).view(shape)
        encoded = Encoded(features=store.arrays["features"], scale=store.scale, frame=store.frame,
                          sam_embeddings=store.arrays.get("sam"))  # older entries have one
        return encoded, missing, store


def encode_volume(slices: np.ndarray, backbone: Backbone, batch_size: int = 1, cache_dir: str | Path = "",
                  progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
                  progress_range: tuple[float, float] = (0.0, 1.0), on_demand: bool = False,
                  step: int = 1) -> VolumeFeatures:
    """Encode every slice of ``slices`` (N, H, W) in [0, 1]. With ``cache_dir`` the result is stored
    under a hash of the pixel data and the backbone's cache tag (model and precision), so the same
    volume is encoded once, and is memory-mapped from there.

    ``on_demand``: encode only the middle block of slices now (the grids' shape comes from it);
    every other slice is encoded when first read (VolumeFeatures.ensure), and progress and
    cancel are then the reader's. ``step``: only every step-th slice and the last are encoded
    (and those VolumeFeatures.keep_exact names); the others read interpolated grids."""
    n, h, w = slices.shape
    lattice = encoding_lattice(n, step)
    folder = None
    if cache_dir:
        folder = Path(cache_dir) / _cache_key(slices, backbone)
        if (folder / "meta.json").is_file():
            try:
                encoded, missing, store = _FeatureStore.load(folder)
                if backbone.provides_sam_embeddings and encoded.sam_embeddings is None:
                    encoded.sam_from_features = backbone.sam_from_features
                if len(encoded.features) == n:
                    encoder = SliceEncoder(slices, backbone, batch_size, store, missing, lattice) \
                        if missing.any() else None
                    if encoder is not None and not on_demand:
                        encoder.fill(encoded.features, lattice[missing[lattice]], cancel=cancel)
                        encoder = encoder if encoder.missing.any() else None
                    if progress:
                        progress(progress_range[1], "encode", f"features of {n} slices from cache")
                    return VolumeFeatures(encoded, (h, w), encoder, step)
            except (OSError, ValueError, KeyError, IndexError, RuntimeError):
                pass
            shutil.rmtree(folder, ignore_errors=True)  # a corrupt cache entry is recomputed, never trusted
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").unlink(missing_ok=True)
    store = _FeatureStore(folder)
    lo, hi = progress_range
    # the first block fixes the grids' shape; on demand it is the block holding the middle slice
    # (organs lie there more often than at the ends). Every block is encoded whole and padded to
    # batch_size (SliceEncoder), so on demand and all at once give the same features.
    batch_size = max(1, batch_size)
    first = int(np.searchsorted(lattice, n // 2)) // batch_size * batch_size if on_demand else 0
    block = lattice[first:first + batch_size]
    missing = np.ones(n, bool)
    try:
        if cancel and cancel():
            raise Cancelled("cancelled while encoding")
        with runtime.encoder_memory():     # see runtime.py
            encoded = backbone.encode(_padded(slices[block], batch_size))
        features = store.allocate("features", (n,) + tuple(encoded.features.shape[1:]))
        features[torch.from_numpy(block)] = encoded.features[:len(block)]
        missing[block] = False
        store.finish(encoded.scale, encoded.frame, missing)
        encoder = SliceEncoder(slices, backbone, batch_size, store, missing, lattice)
        if on_demand:
            if progress:
                progress(hi, "encode", "the other slices are encoded as propagation reaches them")
        else:
            blocks = -(-len(lattice) // batch_size)
            report = None if progress is None else (
                lambda done, _, last: progress(lo + (hi - lo) * (done + 1) / blocks, "encode",
                                               f"encoded slice {last}/{n}"))
            if progress:
                report(0, blocks, int(block[-1]) + 1)
            encoder.fill(features, lattice[missing[lattice]], report, cancel)
    except BaseException:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    encoder = encoder if encoder.missing.any() else None
    # SAM embeddings: the features themselves (LiteMedSAM's neck layer), or made from them
    return VolumeFeatures(Encoded(features=features, scale=encoded.scale, frame=encoded.frame,
                                  sam_embeddings=features if encoded.sam_embeddings is encoded.features else None,
                                  sam_from_features=encoded.sam_from_features), (h, w), encoder, step)
