"""Several adapters of one kind, with seeds seed, seed+1, ..., each trained on its own draw of
training pixels, whose scores are averaged. On another patient nothing painted anchors the
result, and one seed moves single organs a long way (CHAOS, one support patient: seed 0 -> 1
moved the P3 -> P2 spleen 0.53 -> 0.85 and the P2 -> P8 right kidney 0.14 -> 0.30): the mean of
a few is steadier than any one of them (benchmarks/results/cross_patient.md)."""
from __future__ import annotations

import torch

from .base import Adapter, TrainingPixels


class EnsembleAdapter(Adapter):
    kind = "ensemble"

    def __init__(self, members: list[Adapter], seed: int = 0):
        super().__init__(seed=seed)
        if not members:
            raise ValueError("an ensemble needs at least one adapter")
        self.members = list(members)

    @classmethod
    def of(cls, make, count: int, seed: int) -> "EnsembleAdapter":
        """``count`` adapters ``make(seed=...)`` with seeds seed, seed+1, ..."""
        return cls([make(seed=seed + i) for i in range(count)], seed=seed)

    @property
    def n_labels(self) -> int:
        return self.members[0].n_labels

    @n_labels.setter
    def n_labels(self, value) -> None:    # the base class sets it; the members own it
        pass

    def warm_start(self, previous: Adapter) -> None:
        previous_members = getattr(previous, "members", None) or []
        for member, earlier in zip(self.members, previous_members):
            member.warm_start(earlier)

    def fit(self, pixels: TrainingPixels | list[TrainingPixels], progress=None, cancel=None, bf16: bool = False):
        """Each member learns from ``pixels``, or from its own entry of a list of them (one draw
        of training pixels per member: pipeline.train_many)."""
        count = len(self.members)
        draws = pixels if isinstance(pixels, list) else [pixels] * count
        if len(draws) != count:
            raise ValueError(f"{len(draws)} sets of training pixels for {count} adapters")
        for i, (member, draw) in enumerate(zip(self.members, draws)):
            member_progress = None if progress is None else \
                (lambda f, m, i=i: progress((i + f) / count, f"adapter {i + 1}/{count}: {m}"))
            member.fit(draw, member_progress, cancel, bf16)
        return self

    def supported_by(self, target, fraction):
        return EnsembleAdapter([m.supported_by(target, fraction) for m in self.members], seed=self.seed)

    def score_pixels(self, features, index, rows, cols) -> torch.Tensor:
        total = None
        for member in self.members:
            scores = member.score_pixels(features, index, rows, cols)
            total = scores if total is None else total + scores
        return total / len(self.members)

    def state(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "members": [m.state() for m in self.members]}

    @classmethod
    def from_state(cls, state: dict) -> "EnsembleAdapter":
        from . import adapter_from_state         # the package maps kinds to classes

        return cls([adapter_from_state(s) for s in state["members"]], seed=int(state["seed"]))
