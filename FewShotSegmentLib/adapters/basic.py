"""Basic adapter: cosine similarity of each pixel to the mean template feature of each label,
fixed threshold (0.5). No training. Optional feature centring: subtracting the volume's mean
feature removes the component all pixels share, which otherwise makes everything look similar
(measured here: outside-organ cosine 0.38-0.53 without centring)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Adapter, TrainingPixels


class BasicAdapter(Adapter):
    kind = "basic"

    def __init__(self, seed: int = 0, threshold: float = 0.5, center_features: bool = False):
        super().__init__(seed, threshold=threshold, center_features=center_features)
        self.prototypes: torch.Tensor | None = None  # (K, C), uncentred mean features

    def _fit(self, pixels: TrainingPixels, progress=None):
        self.n_labels = pixels.n_labels
        self.prototypes = torch.stack([pixels.features[pixels.labels == k].mean(0)
                                       for k in range(1, self.n_labels + 1)])

    def supported_by(self, target, fraction):
        copy = type(self).from_state(self.state())
        protos = self.prototypes.clone()
        for k, feats in target.items():
            if len(feats):
                protos[k - 1] = (1 - fraction) * protos[k - 1] + fraction * feats.float().mean(0)
        copy.prototypes = protos
        return copy

    def _score(self, feats, features):
        protos = self.prototypes
        if self.options["center_features"]:
            # the centre is the mean over the volume being segmented, so it adapts to each patient
            center = features.mean_feature()
            feats, protos = feats - center, protos - center
        cos = F.normalize(feats, dim=-1) @ F.normalize(protos, dim=-1).T      # (n, K)
        background = torch.full((1, len(cos)), self.options["threshold"])
        return torch.cat([background, cos.T])

    def state(self):
        return {**super().state(), "prototypes": self.prototypes}

    def _load(self, state):
        self.prototypes = state["prototypes"]
