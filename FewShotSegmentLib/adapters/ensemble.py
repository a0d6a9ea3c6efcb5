"""Several adapters of one kind, with seeds seed, seed+1, ..., each trained on its own draw of
training pixels, whose scores are averaged. On another patient nothing painted anchors the
result, and one seed moves single organs a long way (CHAOS, one support patient: seed 0 -> 1
moved the P3 -> P2 spleen 0.53 -> 0.85 and the P2 -> P8 right kidney 0.14 -> 0.30): the mean of
a few is steadier than any one of them (benchmarks/results/cross_patient.md)."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from ..errors import Cancelled
from ..runtime import one_thread
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
        of training pixels per member: pipeline.train_many).

        Members train side by side, as many at once as this process has torch threads: each
        trains on one thread (Adapter.fit), so its weights are those it gets when trained alone,
        and 3 adapters on 2 cores take 2 rounds instead of 3. When one member fails or the job is
        cancelled, the others stop at their next progress report."""
        count = len(self.members)
        draws = pixels if isinstance(pixels, list) else [pixels] * count
        if len(draws) != count:
            raise ValueError(f"{len(draws)} sets of training pixels for {count} adapters")
        fractions, reporting = [0.0] * count, threading.Lock()

        def member_progress(i):
            if progress is None:
                return None

            def report(fraction, message):      # called from the members' threads
                with reporting:
                    fractions[i] = fraction
                    progress(sum(fractions) / count, f"adapter {i + 1}/{count}: {message}")
            return report

        workers = min(count, torch.get_num_threads())
        if workers <= 1:
            for i, (member, draw) in enumerate(zip(self.members, draws)):
                member.fit(draw, member_progress(i), cancel, bf16)
            return self
        failed = threading.Event()

        def stopping() -> bool:
            return failed.is_set() or (cancel is not None and cancel())

        def train(i: int) -> None:
            if stopping():          # a member still waiting when another failed or the job was cancelled
                raise Cancelled("cancelled while training the adapters")
            try:
                self.members[i].fit(draws[i], member_progress(i), stopping, bf16)
            except BaseException:
                failed.set()        # here, before this thread takes the next member
                raise

        # one torch thread for the pool's threads too: they take the process's count when they start
        with one_thread(), ThreadPoolExecutor(workers, thread_name_prefix="adapter-fit") as pool:
            futures = [pool.submit(train, i) for i in range(count)]
            try:
                wait(futures)
            except BaseException:   # KeyboardInterrupt in this thread
                failed.set()
                for future in futures:
                    future.cancel()
                raise
        errors = [error for error in (future.exception() for future in futures) if error is not None]
        if errors:      # the error that stopped the others, not their Cancelled
            raise next((e for e in errors if not isinstance(e, Cancelled)), errors[0])
        return self

    def supported_by(self, target, fraction):
        return EnsembleAdapter([m.supported_by(target, fraction) for m in self.members], seed=self.seed)

    def _score(self, feats, features) -> torch.Tensor:
        """The members' mean score, all of them on the same sampled pixel features (the base
        class's score_pixels samples each chunk once: per member it had been a third of the
        scoring's time across patients)."""
        total = None
        for member in self.members:
            scores = member._score(feats, features)
            total = scores if total is None else total + scores
        return total / len(self.members)

    def state(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "members": [m.state() for m in self.members]}

    @classmethod
    def from_state(cls, state: dict) -> "EnsembleAdapter":
        from . import adapter_from_state         # the package maps kinds to classes

        return cls([adapter_from_state(s) for s in state["members"]], seed=int(state["seed"]))
