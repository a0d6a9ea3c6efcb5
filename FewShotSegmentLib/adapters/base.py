"""What every adapter shares: training-pixel sampling from painted template slices, feature
standardization, and the slice-scoring interface used by propagation."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..errors import Cancelled
from ..runtime import one_thread
from ..features import VolumeFeatures


# Scoring runs on chunks of a fixed size, the last one padded to a power of two (at least
# MIN_CHUNK): every matmul then has one of a few shapes. With as many shapes as slices (the
# adaptive scoring's point counts vary per slice) oneDNN kept a primitive per shape and the
# chunk-sized temporaries fragmented the heap: scoring a 512x512x300 CT grew the process by 3 GB
# (1.4 GB of it free but not returned); per chunk, the temporaries are a few MB.
SCORE_CHUNK = 4096
MIN_CHUNK = 256

# torch's default generator, which initializes a network's weights, is one per process: adapters
# trained side by side in threads (EnsembleAdapter.fit) seed it and build under this lock
_SEEDED_BUILD = threading.Lock()


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
    negatives that decide where a boundary lies). Painting is rarely exact: an organ painted a
    little inside its border would teach "organ rim = background". So unpainted pixels within a
    margin of a stroke (``negative_margin_fraction`` of its equivalent radius) are negatives only
    if their features are nearer the slice's background than that stroke (nearest centroid, features
    centred on the slice's sample): the tissue just outside a well-painted organ differs from it
    and stays a negative, an unpainted rim of the organ does not. ``negative_margin_px`` > 0 drops
    every background pixel closer than that (the paper's negatives >= 10 px away).
    """
    rng = rng or np.random.default_rng(0)
    feats, labels = [], []
    for index in template_slices:
        plane = template[index]
        present = [k for k in np.unique(plane) if k > 0]
        # distance beyond the nearest stroke's margin (negative: inside a margin), and that stroke
        beyond = np.full(plane.shape, np.inf)
        nearest = np.zeros(plane.shape, np.int64)
        stroke_feats = {}
        for k in present:
            mask = plane == k
            rows, cols = np.nonzero(mask)
            pick = rng.choice(len(rows), size=min(samples_per_label, len(rows)), replace=False)
            stroke_feats[k] = features.sample(index, rows[pick], cols[pick])
            feats.append(stroke_feats[k])
            labels.append(np.full(len(pick), k))
            radius = np.sqrt(len(rows) / np.pi)
            margin = max(negative_margin_px, int(np.ceil(negative_margin_fraction * radius)))
            distance = ndimage.distance_transform_edt(~mask) - margin
            nearest[distance < beyond] = k
            beyond = np.minimum(beyond, distance)
        outside = plane == 0
        allowed = outside & (beyond >= 0)
        if negative_margin_fraction > 0 and negative_margin_px == 0:
            allowed |= _background_like(features, index, outside & (beyond < 0), allowed, nearest,
                                        stroke_feats, rng)
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


def _background_like(features: VolumeFeatures, index: int, zone: np.ndarray, background: np.ndarray,
                     nearest: np.ndarray, stroke_feats: dict, rng: np.random.Generator) -> np.ndarray:
    """The pixels of ``zone`` (unpainted, close to a stroke) whose feature is nearer (cosine, after
    centring) to the mean of the slice's sure background than to the mean of their nearest stroke."""
    result = np.zeros(zone.shape, bool)
    rows, cols = np.nonzero(zone)
    b_rows, b_cols = np.nonzero(background)
    if len(rows) == 0 or len(b_rows) == 0:
        return result
    pick = rng.choice(len(b_rows), size=min(4000, len(b_rows)), replace=False)
    background_mean = features.sample(index, b_rows[pick], b_cols[pick]).mean(0)
    stroke_means = {k: f.mean(0) for k, f in stroke_feats.items()}
    centre = torch.stack([background_mean, *stroke_means.values()]).mean(0)
    candidates = torch.nn.functional.normalize(features.sample(index, rows, cols) - centre, dim=1)
    to_background = candidates @ torch.nn.functional.normalize(background_mean - centre, dim=0)
    # each stroke's direction once, then gathered for the pixels (not one per pixel: thousands a slice)
    labels = sorted(stroke_means)
    directions = torch.stack([torch.nn.functional.normalize(stroke_means[k] - centre, dim=0) for k in labels])
    row_of = np.zeros(max(labels) + 1, np.int64)
    row_of[labels] = np.arange(len(labels))
    own = directions[torch.from_numpy(row_of[nearest[rows, cols]])]
    to_stroke = (candidates * own).sum(1)
    keep = (to_background > to_stroke).numpy()
    result[rows[keep], cols[keep]] = True
    return result


class Adapter:
    """Base class. ``fit`` learns from TrainingPixels; ``score_slice`` returns (K+1, H', W') scores
    for background and each label on one slice (at ``stride``), ``score_pixels`` (K+1, n) for
    chosen pixels (both through the adapter's ``_score``), where the predicted label is the
    argmax; ``state``/``from_state`` serialize to plain tensors and numbers (weights_only-safe)."""
    kind = "base"

    def __init__(self, seed: int = 0, **options):
        self.seed = seed
        self.options = options
        self.n_labels = 0
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self._warm: dict | None = None      # a previous adapter's state to start the next fit from

    def warm_start(self, previous: "Adapter") -> None:
        """Start the next fit from ``previous``'s weights and feature standardization (the same
        kind and labels, trained on an earlier painting of the same volume): one more painted
        slice moves the optimum a little, so training from there stops on its plateau sooner."""
        if previous is not None and previous.kind == self.kind and getattr(previous, "net", None) is not None:
            self._warm = previous.state()

    def _build_seeded(self) -> None:
        """_build() with initial weights drawn from ``self.seed`` alone, whatever other threads do
        with torch's default generator meanwhile (its state is restored afterwards)."""
        with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._build()

    def _apply_warm_start(self) -> bool:
        """After _build(): load the warm-start weights if they fit; True if they did."""
        warm, self._warm = self._warm, None
        if warm is None or int(warm["n_labels"]) != self.n_labels or int(warm.get("in_dim", -1)) != self.in_dim:
            return False
        self.net.load_state_dict(warm["net"])
        return True

    def supported_by(self, target: dict[int, torch.Tensor], fraction: float) -> "Adapter":
        """A copy that also compares with pixels of the volume being labelled: ``target`` maps a
        label k to raw features (n, C) of pixels the first pass was sure of; ``fraction`` of the
        label's references (or prototype) come from them. Another patient's organ looks more like
        itself than like the template's (self-support). Adapters without references return self."""
        return self

    # --- standardization of features, learned from the training pixels -------------------------
    def _fit_standardization(self, feats: torch.Tensor):
        warm = self._warm
        if warm is not None and warm.get("mean") is not None and warm["mean"].shape == feats.shape[1:]:
            self.mean, self.std = warm["mean"], warm["std"]   # the warm weights expect these inputs
            return
        self.mean = feats.mean(0)
        self.std = feats.std(0).clamp_min(1e-4)

    def _standardize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std

    def fit(self, pixels: TrainingPixels, progress=None, cancel=None, bf16: bool = False):
        """Learn from the template pixels; progress(fraction, message) is called now and then, and
        ``cancel()`` is asked at each of those calls (a True answer raises Cancelled). ``bf16``:
        matmuls in bfloat16 (weights and optimizer stay float32), for CPUs with AMX /
        AVX512-BF16 (measured there: 6.8 ms a contrastive step instead of 16.7)."""
        def report(fraction, message):
            if cancel is not None and cancel():
                raise Cancelled("cancelled while training the adapter")
            if progress is not None:
                progress(fraction, message)

        # one thread whatever the machine's load: SGD's result depends on the order of its sums,
        # so a painting gives the same adapter on any machine, busy or idle
        # no autocast cache: it would keep the bf16 copy of the first step's weights for the
        # whole fit (the optimizer updates the float32 ones), and nothing would be learnt
        with one_thread(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            self._fit(pixels, report)

    def _fit(self, pixels: TrainingPixels, progress=None):
        raise NotImplementedError

    def score_slice(self, features: VolumeFeatures, index: int, stride: int = 1) -> torch.Tensor:
        """(K+1, H', W') scores on every ``stride``-th pixel of slice ``index``."""
        h, w = features.slice_shape
        rows, cols = np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij")
        return self.score_pixels(features, index, rows.ravel(), cols.ravel()).view(-1, *rows.shape)

    @torch.inference_mode()
    def score_pixels(self, features: VolumeFeatures, index: int, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """(K+1, n) scores of the pixels (rows, cols) of slice ``index``, SCORE_CHUNK pixels at a
        time, the last chunk padded to a power of two (see SCORE_CHUNK)."""
        rows, cols = np.asarray(rows), np.asarray(cols)
        out = []
        for start in range(0, len(rows), SCORE_CHUNK):
            r, c = rows[start:start + SCORE_CHUNK], cols[start:start + SCORE_CHUNK]
            count = len(r)
            size = max(MIN_CHUNK, 1 << (count - 1).bit_length())
            if size > count:             # repeat the last pixel; its copies are dropped below
                r, c = np.pad(r, (0, size - count), mode="edge"), np.pad(c, (0, size - count), mode="edge")
            out.append(self._score(features.sample(index, r, c), features)[:, :count])
        return torch.cat(out, 1) if out else self._score(features.sample(index, rows, cols), features)

    def _score(self, feats: torch.Tensor, features: VolumeFeatures) -> torch.Tensor:
        """(n, C) pixel features -> (K+1, n) scores."""
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


class Plateau:
    """Stops training when the loss has stopped falling: the mean loss of each window of
    ``window`` steps is compared with the best window so far; two windows in a row without a 5 %
    improvement mean a plateau. On template pixels the pair loss typically reaches ~0.001 within
    a few hundred of the 1500 default steps; the rest changed nothing measurable."""

    def __init__(self, window: int, patience: int = 2, improvement: float = 0.05):
        self.window, self.patience, self.improvement = window, patience, improvement
        self.total, self.count, self.best, self.stale = 0.0, 0, float("inf"), 0

    def update(self, loss: torch.Tensor) -> bool:
        if self.window <= 0:
            return False
        self.total += float(loss)
        self.count += 1
        if self.count < self.window:
            return False
        mean, self.total, self.count = self.total / self.window, 0.0, 0
        if mean < self.best * (1 - self.improvement):
            self.best, self.stale = mean, 0
        else:
            self.stale += 1
        return self.stale >= self.patience


def mlp(sizes: list[int]) -> torch.nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)
