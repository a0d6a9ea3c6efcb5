"""Classification adapter: a 3-layer MLP on standardized pixel features, K+1 classes (background
and each label), cross-entropy with class weights so the sampled classes count equally."""
from __future__ import annotations

import torch

from .base import Adapter, TrainingPixels, mlp


class ClassificationAdapter(Adapter):
    kind = "classification"

    def __init__(self, seed: int = 0, epochs: int = 60, hidden: int = 256, lr: float = 1e-3, batch: int = 1024):
        super().__init__(seed, epochs=epochs, hidden=hidden, lr=lr, batch=batch)
        self.net: torch.nn.Module | None = None
        self.in_dim = 0

    def _build(self):
        h = self.options["hidden"]
        self.net = mlp([self.in_dim, h, h // 2, self.n_labels + 1])

    def _fit(self, pixels: TrainingPixels, progress=None):
        generator = torch.Generator().manual_seed(self.seed)
        self.n_labels, self.in_dim = pixels.n_labels, pixels.features.shape[1]
        self._fit_standardization(pixels.features)
        x = self._standardize(pixels.features)
        y = pixels.labels
        self._build_seeded()
        self._apply_warm_start()
        counts = torch.bincount(y, minlength=self.n_labels + 1).float().clamp_min(1)
        loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / counts / len(counts))
        opt = torch.optim.Adam(self.net.parameters(), lr=self.options["lr"], weight_decay=1e-4)
        self.net.train()
        epochs, batch = self.options["epochs"], self.options["batch"]
        for epoch in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch):
                idx = order[start:start + batch]
                opt.zero_grad()
                loss = loss_fn(self.net(x[idx]), y[idx])
                loss.backward()
                opt.step()
            if progress:
                progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
        self.net.eval()

    def _score(self, feats, features):
        return torch.softmax(self.net(self._standardize(feats)), -1).T

    def state(self):
        return {**super().state(), "in_dim": self.in_dim, "net": self.net.state_dict()}

    def _load(self, state):
        self.in_dim = int(state["in_dim"])
        self._build()
        self.net.load_state_dict(state["net"])
        self.net.eval()
