"""Router traces for the offload policy: deterministic synthetic generator and an ``.npz`` store.

A trace holds, per decode step ``s``, MoE layer ``l`` and token ``t``, the top-k expert ids the router chose
(``topk`` [S, L, T, K]) and the ids a next-layer look-ahead router predicted for them (``pred``, same shape; the
prediction of layer l is made while layer l-1 computes).

The synthetic generator mimics recorded MoE routing: per-layer Zipf-like expert popularity whose ranking drifts
over time, temporal locality (a token keeps an expert from its previous step with probability ``locality``),
distinct top-k per token, and a look-ahead prediction that is right with probability ``pred_acc`` per slot.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RouterTrace:
    """Recorded routing decisions.

    Attributes:
        topk: [S, L, T, K] int expert ids.
        pred: [S, L, T, K] int predicted expert ids (look-ahead router).
        num_experts: E.
    """

    topk: np.ndarray
    pred: np.ndarray
    num_experts: int

    def __post_init__(self) -> None:
        if self.topk.ndim != 4 or self.topk.shape != self.pred.shape:
            raise ValueError(f"RouterTrace: topk/pred must both be [S, L, T, K], got {self.topk.shape} / {self.pred.shape}")
        if self.topk.size and (self.topk.min() < 0 or self.topk.max() >= self.num_experts
                               or self.pred.min() < 0 or self.pred.max() >= self.num_experts):
            raise ValueError(f"RouterTrace: expert ids outside [0, {self.num_experts})")

    @property
    def num_steps(self) -> int:
        return self.topk.shape[0]

    @property
    def num_layers(self) -> int:
        return self.topk.shape[1]

    @property
    def tokens(self) -> int:
        return self.topk.shape[2]

    def counts(self, step: int, layer: int) -> np.ndarray:
        """[E] int64 tokens routed to each expert."""
        return np.bincount(self.topk[step, layer].ravel(), minlength=self.num_experts)

    def predicted_counts(self, step: int, layer: int) -> np.ndarray:
        """[E] int64 look-ahead prediction of ``counts(step, layer)``."""
        return np.bincount(self.pred[step, layer].ravel(), minlength=self.num_experts)

    def save(self, path: str) -> None:
        """Write an ``.npz`` atomically (temp file then rename)."""
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, topk=self.topk.astype(np.int16), pred=self.pred.astype(np.int16),
                                    num_experts=np.int64(self.num_experts))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str) -> "RouterTrace":
        with np.load(path) as z:
            missing = {"topk", "pred", "num_experts"} - set(z.files)
            if missing:
                raise ValueError(f"RouterTrace.load({path!r}): missing arrays {sorted(missing)}")
            return cls(topk=z["topk"].astype(np.int64), pred=z["pred"].astype(np.int64),
                       num_experts=int(z["num_experts"]))


def synth_trace(num_steps: int, num_layers: int, num_experts: int, top_k: int, tokens: int, seed: int = 0,
                zipf_a: float = 1.0, drift: float = 0.05, locality: float = 0.6, pred_acc: float = 0.85) -> RouterTrace:
    """Deterministic synthetic router trace (same arguments -> identical arrays).

    Args:
        num_steps / num_layers / num_experts / top_k / tokens: S, L, E, K, T.
        seed: RNG seed.
        zipf_a: popularity exponent: expert of rank r is chosen with weight 1 / (r + 1) ** zipf_a.
        drift: per step and layer, fraction of experts whose popularity rank swaps with a neighbour.
        locality: probability that a token keeps each expert it used at the previous step.
        pred_acc: probability that a look-ahead prediction slot equals the true expert.
    Returns:
        the ``RouterTrace``.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"synth_trace: need 1 <= top_k <= num_experts, got top_k={top_k}, E={num_experts}")
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_experts + 1) ** zipf_a
    rank = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])   # [L, E] expert at each rank
    topk = np.zeros((num_steps, num_layers, tokens, top_k), np.int64)
    pred = np.zeros_like(topk)
    n_swap = int(round(drift * num_experts))
    for s in range(num_steps):
        for l in range(num_layers):
            for _ in range(n_swap):                       # popularity drift: adjacent rank swaps
                r = int(rng.integers(0, num_experts - 1))
                rank[l, r], rank[l, r + 1] = rank[l, r + 1], rank[l, r]
            p = np.empty(num_experts)
            p[rank[l]] = weights
            for t in range(tokens):
                keep = [int(e) for e in topk[s - 1, l, t] if rng.random() < locality] if s else []
                q = p.copy()
                q[keep] = 0.0
                new = rng.choice(num_experts, size=top_k - len(keep), replace=False, p=q / q.sum())
                topk[s, l, t] = np.concatenate([np.asarray(keep, np.int64), new])
            right = rng.random((tokens, top_k)) < pred_acc
            guess = rng.choice(num_experts, size=(tokens, top_k), p=p / p.sum())
            pred[s, l] = np.where(right, topk[s, l], guess)
    return RouterTrace(topk=topk, pred=pred, num_experts=num_experts)
