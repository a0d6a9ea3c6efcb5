"""Contrastive adapter (the paper's contribution): a Siamese MLP with shared weights embeds a
reference RoI pixel and another pixel; the two embeddings are concatenated (with their absolute
difference and product, so a small head can compare them) and a softmax says "same RoI" or not.

Training pairs: the reference is a pixel of label k; the pair is positive when the other pixel is
also in label k, negative when it lies outside it (background, or another label's RoI).
Inference: each target pixel is paired with ``n_references`` stored reference pixels of every
label; its score for a label is the mean "same" probability; the background score is the
threshold, so a pixel takes the most probable label only when that label is more likely than not.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, Plateau, TrainingPixels, mlp

# (pixel, reference) pairs per same_probability call at inference: its (pairs, hidden) temporaries
# then stay near a core's L2 cache (16384 x 64 bf16 = 2 MB), whatever the number of labels.
# Measured on these CPUs (64 references, bf16, one thread): 5.8-8.0 us a pixel from 128 to 1024
# pixels a call (fp32 14.3-21.0), the unfused head 10-16 us (fp32 20-42).
PAIR_BUDGET = 16384


class SiamesePairNet(torch.nn.Module):
    def __init__(self, in_dim: int, hidden: int = 256, embed: int = 64):
        super().__init__()
        self.embed = mlp([in_dim, hidden, hidden // 2, embed])     # shared by both branches
        self.head = mlp([4 * embed, embed, 2])

    def pair_logits(self, ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """ref, other: embeddings broadcastable to (..., E) -> logits (..., 2)."""
        ref, other = torch.broadcast_tensors(ref, other)
        return self.head(torch.cat([ref, other, (ref - other).abs(), ref * other], -1))

    def same_probability(self, refs: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        """P(same RoI) for every (other, ref) pair at inference: refs (R, E), others (P, E) -> (P, R)
        float32 (see ReferencePairs; for many chunks of pixels against the same refs, build
        ``self.references_for_pairs(refs)`` once)."""
        return self.references_for_pairs(refs).same_probability(others)

    def references_for_pairs(self, refs: torch.Tensor) -> "ReferencePairs":
        """The pixel-independent part of same_probability for refs (R, E), in the autocast dtype
        where autocast is on (bf16 on CPUs with AMX / AVX512-BF16)."""
        first, _, last = self.head
        e = refs.shape[1]
        dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else refs.dtype
        w_ref, w_other, w_diff, w_prod = first.weight.split(e, dim=1)
        return ReferencePairs(
            refs=refs.to(dt),
            per_ref=(refs @ w_ref.T + first.bias).reshape(1, -1).to(dt),                      # (1, R*H)
            folded=(w_prod[None] * refs[:, None] + w_other[None]).reshape(-1, e).T.to(dt),   # (E, R*H)
            w_diff=w_diff.T.to(dt), w_last=(last.weight[1] - last.weight[0]).to(dt),
            b_last=(last.bias[1] - last.bias[0]).to(dt))

    def forward(self, ref_feats, other_feats):
        return self.pair_logits(self.embed(ref_feats), self.embed(other_feats))


@dataclass
class ReferencePairs:
    """SiamesePairNet's pair head with its references folded in: P(same RoI) of pixels against R
    references, equal to softmax(pair_logits)[..., 1] (the hot loop of propagation), without ever
    building the (P, R, 4E) concatenation. The head's first layer is split by its four input
    blocks; the "other" and "product" blocks are linear in the pixel, so for each reference r they
    fold into one matrix W_other + W_prod * r, and all of them go through ONE GEMM
    (P, E) x (E, R*H); only |ref - other| is per pair, one more GEMM added in place."""
    refs: torch.Tensor        # (R, E)
    per_ref: torch.Tensor     # (1, R*H): W_ref r + b
    folded: torch.Tensor      # (E, R*H)
    w_diff: torch.Tensor      # (E, H)
    w_last: torch.Tensor      # (H,): "same" minus "other" row of the last layer
    b_last: torch.Tensor

    def same_probability(self, others: torch.Tensor) -> torch.Tensor:
        """others (P, E) -> (P, R) float32."""
        n_refs, e = self.refs.shape
        others = others.to(self.refs.dtype)
        h = torch.addmm(self.per_ref, others, self.folded)                           # (P, R*H)
        diff = (self.refs[None] - others[:, None]).abs_()                            # (P, R, E)
        # in-place ops and explicit casts: autocast does not cover addmm_ / relu_
        h = h.view(-1, self.w_diff.shape[1]).addmm_(diff.view(-1, e), self.w_diff).relu_()
        return torch.sigmoid((h @ self.w_last + self.b_last).float()).view(-1, n_refs)


class ContrastiveAdapter(Adapter):
    kind = "contrastive"

    def __init__(self, seed: int = 0, steps: int = 1500, batch: int = 1024, lr: float = 1e-3,
                 hidden: int = 256, embed: int = 64, n_references: int = 16, threshold: float = 0.5,
                 plateau_steps: int = 0):
        super().__init__(seed, steps=steps, batch=batch, lr=lr, hidden=hidden, embed=embed,
                         n_references=n_references, threshold=threshold, plateau_steps=plateau_steps)
        self.steps_run = 0
        self.net: SiamesePairNet | None = None
        self.in_dim = 0
        self.references: torch.Tensor | None = None   # (K, M, C) standardized reference features

    def _build(self):
        self.net = SiamesePairNet(self.in_dim, self.options["hidden"], self.options["embed"])

    def _fit(self, pixels: TrainingPixels, progress=None):
        gen = torch.Generator().manual_seed(self.seed)
        self.n_labels, self.in_dim = pixels.n_labels, pixels.features.shape[1]
        self._fit_standardization(pixels.features)
        # pixels are standardized as they are drawn: a standardized copy of all of them is as large
        # as the training pixels (hundreds of MB from several volumes), one per member training at once
        def x(index):
            return self._standardize(pixels.features[index])

        y = pixels.labels
        self._build_seeded()
        warm = self._apply_warm_start()
        members = [torch.nonzero(y == k).flatten() for k in range(self.n_labels + 1)]
        outsiders = [torch.nonzero(y != k).flatten() for k in range(self.n_labels + 1)]
        if any(len(m) == 0 for m in members[1:]):
            raise ValueError("every label needs template pixels")

        def pool_table(pools):
            # (K+1, longest) index table; row k holds pool k, so a pick is one gather, not a loop
            table = torch.zeros(len(pools), max(len(p) for p in pools), dtype=torch.long)
            for k, pool in enumerate(pools):
                if len(pool):
                    table[k, :len(pool)] = pool
            return table, torch.tensor([len(p) for p in pools])

        def pick(table, sizes, ks):
            offsets = (torch.rand(len(ks), generator=gen) * sizes[ks]).long()
            return table[ks, offsets]

        member_table, member_sizes = pool_table(members)
        outsider_table, outsider_sizes = pool_table(outsiders)

        opt = torch.optim.Adam(self.net.parameters(), lr=self.options["lr"], weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        steps, batch = self.options["steps"], self.options["batch"]
        self.net.train()
        # from a warm start the loss begins near its plateau: half-length windows confirm it
        # (the first window and two without 5 % gain: 150 steps instead of 300 at the default)
        window = self.options.get("plateau_steps", 0)
        plateau = Plateau(max(1, window // 2) if warm and window else window)
        for step in range(steps):
            ks = torch.randint(1, self.n_labels + 1, (batch,), generator=gen)
            positive = torch.rand(batch, generator=gen) < 0.5
            ref = pick(member_table, member_sizes, ks)
            other = torch.where(positive, pick(member_table, member_sizes, ks),
                                pick(outsider_table, outsider_sizes, ks))
            opt.zero_grad()
            loss = loss_fn(self.net(x(ref), x(other)), positive.long())
            loss.backward()
            opt.step()
            self.steps_run = step + 1
            if plateau.update(loss.detach()):
                break
            if progress and (step + 1) % 20 == 0:   # often enough for a prompt cancel
                progress((step + 1) / steps, f"step {step + 1}/{steps} loss {loss.item():.3f}")
        self.net.eval()
        m = self.options["n_references"]
        self.references = torch.stack([x(members[k][torch.randperm(len(members[k]), generator=gen)[:m]])
                                       if len(members[k]) >= m else
                                       x(members[k][torch.randint(len(members[k]), (m,), generator=gen)])
                                       for k in range(1, self.n_labels + 1)])

    def supported_by(self, target, fraction):
        copy = type(self).from_state(self.state())
        m = self.options["n_references"]
        refs = self.references.clone()
        for k, feats in target.items():
            n = min(int(round(fraction * m)), len(feats))
            if n:       # the template's first references stay, the target's take the last places
                refs[k - 1, m - n:] = self._standardize(feats[:n].float())
        copy.references = refs
        return copy

    def _score(self, feats, features):
        emb = self.net.embed(self._standardize(feats))                 # (n, E)
        k, m, c = self.references.shape
        ref = self.net.embed(self.references.reshape(k * m, c))        # (K*M, E)
        pairs = self.net.references_for_pairs(ref)                     # once for every chunk
        scores = []
        for chunk in emb.split(max(16, PAIR_BUDGET // (k * m))):
            same = pairs.same_probability(chunk)                       # (p, K*M)
            scores.append(same.view(len(chunk), k, m).mean(-1))
        scores = torch.cat(scores).T if scores else torch.zeros(k, 0)
        background = torch.full((1, scores.shape[1]), self.options["threshold"])
        return torch.cat([background, scores])

    def state(self):
        return {**super().state(), "in_dim": self.in_dim, "net": self.net.state_dict(),
                "references": self.references}

    def _load(self, state):
        self.in_dim = int(state["in_dim"])
        self.references = state["references"]
        self._build()
        self.net.load_state_dict(state["net"])
        self.net.eval()
