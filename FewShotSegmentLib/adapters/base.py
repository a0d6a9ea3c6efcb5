"""What every adapter shares: training-pixel sampling from painted template slices, feature
standardization, and the slice-scoring interface used by propagation."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..features import VolumeFeatures


@dataclass
class TrainingPixels:
    """Pixel features sampled from template slices. ``labels``: 0 = background, k = k-th label."""
    features: torch.Tensor   # (n, C) float32
    labels: torch.Tensor     # (n,) int64

    @property
    def n_labels(self) -> int:
        return int(self.labels.max())


def sample_training_pixels(features: VolumeFeatures, template: np.ndarray, template_slices: list[int],
                           samples_per_label: int, negative_margin_px: int = 0,
                           rng: np.random.Generator | None = None,
                           negative_margin_fraction: float = 0.0) -> TrainingPixels:
    """Sample pixels of every label and a balanced set of background pixels on each template slice.

    template: (N, H, W) label indices along the propagation axis (0 background, 1..K labels).
    Background is half 'anywhere outside the RoIs' and half from a 15-px ring around them (the hard
    negatives that decide where a boundary lies). Pixels closer to a stroke than its margin are not
    used as negatives: the margin is ``negative_margin_px`` (the paper's negatives >= 10 px away)
    or ``negative_margin_fraction`` of the stroke's equivalent radius, whichever is larger, so an
    organ painted a little inside its border does not teach "organ rim = background".
    """
    rng = rng or np.random.default_rng(0)
    feats, labels = [], []
    for index in template_slices:
        plane = template[index]
        present = [k for k in np.unique(plane) if k > 0]
        # distance beyond the nearest stroke's margin (negative: inside a margin)
        beyond = np.full(plane.shape, np.inf)
        for k in present:
            mask = plane == k
            rows, cols = np.nonzero(mask)
            pick = rng.choice(len(rows), size=min(samples_per_label, len(rows)), replace=False)
            feats.append(features.sample(index, rows[pick], cols[pick]))
            labels.append(np.full(len(pick), k))
            radius = np.sqrt(len(rows) / np.pi)
            margin = max(negative_margin_px, 1, int(np.ceil(negative_margin_fraction * radius)))
            beyond = np.minimum(beyond, ndimage.distance_transform_edt(~mask) - margin)
        allowed = (plane == 0) & (beyond >= 0)
        ring = allowed & (beyond <= 15)
        n_background = samples_per_label * max(1, len(present))
        for pool, share in ((allowed, 0.5), (ring, 0.5)):
            rows, cols = np.nonzero(pool)
            if len(rows) == 0:
                continue
            count = min(int(n_background * share), len(rows))
            pick = rng.choice(len(rows), size=count, replace=False)
            feats.append(features.sample(index, rows[pick], cols[pick]))
            labels.append(np.zeros(len(pick), dtype=np.int64))
    return TrainingPixels(torch.cat(feats), torch.from_numpy(np.concatenate(labels).astype(np.int64)))


class Adapter:
    """Base class. ``fit`` learns from TrainingPixels; ``score_slice`` returns (K+1, H', W') scores
    for background and each label on one slice (at ``stride``), where the predicted label is the
    argmax; ``state``/``from_state`` serialize to plain tensors and numbers (weights_only-safe)."""
    kind = "base"

    def __init__(self, seed: int = 0, **options):
        self.seed = seed
        self.options = options
        self.n_labels = 0
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    # --- standardization of features, learned from the training pixels -------------------------
    def _fit_standardization(self, feats: torch.Tensor):
        self.mean = feats.mean(0)
        self.std = feats.std(0).clamp_min(1e-4)

    def _standardize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std

    def fit(self, pixels: TrainingPixels, progress=None):
        """Learn from the template pixels; progress(fraction, message) is called now and then."""
        with single_thread():
            self._fit(pixels, progress)

    def _fit(self, pixels: TrainingPixels, progress=None):
        raise NotImplementedError

    def score_slice(self, features: VolumeFeatures, index: int, stride: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "n_labels": self.n_labels, "options": dict(self.options),
                "mean": self.mean, "std": self.std}

    @classmethod
    def from_state(cls, state: dict) -> "Adapter":
        adapter = cls(seed=int(state["seed"]), **state["options"])
        adapter.n_labels = int(state["n_labels"])
        adapter.mean, adapter.std = state["mean"], state["std"]
        adapter._load(state)
        return adapter

    def _load(self, state: dict):
        pass


@contextmanager
def single_thread():
    """Train small MLPs on one thread: their ops are too small to gain from more, and with any
    other busy process on the machine the threads' synchronization made training 30x slower
    (measured here: 300 steps 7 s on one thread, 227 s on two beside an encoder)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def mlp(sizes: list[int]) -> torch.nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)
