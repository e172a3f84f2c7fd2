"""Offline KV calibration algorithms (pure functions on captured per-layer q/k/v; no hooks, no I/O).

* ``channel_order``: within-head channel permutation for per-token groups (SKVQ's reorder, restricted to one head
  so pages stay per-head and TP sharding works; SKVQ clusters (min, max) with KMeans into variable groups, we sort
  channels by range and cut equal groups, which the fixed-group slot format needs).
* ``calibrate_layer``: per candidate K/V config, the clip ratios (K then V, coordinate search over a grid) that
  minimise the attention-output error of the layer (SKVQ's criterion; its code used one global alpha).
* ``search_bits``: per-layer K/V bits under an average-bits budget (KVTuner's problem). KVTuner runs NSGA-II on
  downstream accuracy over hand-clustered layer groups; we have no downstream eval offline, so we use its
  per-layer attention-output error as an additive proxy, prune each layer to its Pareto front (error vs bits) and
  solve the resulting multiple-choice knapsack EXACTLY by dynamic programming over integer slot bytes. Exact,
  deterministic, milliseconds for 100 layers; candidates keep K bits >= V bits (KVTuner: K matters more).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxserve_kernels.attention import reference as R
from mxserve_kernels.attention.kv_format import KVSlotFormat

from mxserve.kvcache.bits import default_format
from mxserve.kvcache.config import KVLayerConfig

DEFAULT_CANDIDATES = ("K8V8", "K8V4", "K4V4", "K4V2", "K2V2", "K2V1.5")
CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85)


def channel_order(x: torch.Tensor) -> torch.Tensor:
    """Within-head channel order: channels sorted by calibrated range (max - min), widest first.

    Args:
        x: [N, H, D] calibration keys or values.
    Returns:
        [H, D] int32 permutation (slot channel j holds channel perm[h, j]).
    """
    rng = x.float().amax(0) - x.float().amin(0)
    return torch.argsort(rng, dim=-1, descending=True, stable=True).to(torch.int32)


def attention_error(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fmt: KVSlotFormat, scale: float,
                    k_perm: torch.Tensor | None = None, v_perm: torch.Tensor | None = None, k_clip: float = 1.0,
                    v_clip: float = 1.0, sink: int = 0, n_queries: int = 128) -> tuple[float, float]:
    """Squared attention-output error of the quantized cache on one sequence (past-only, FP sinks, no window).

    Args:
        q: [N, Hq, D]; k, v: [N, H, D] post-RoPE. n_queries: the last n_queries positions are scored.
    Returns:
        (sum of squared error, sum of squared reference output) over the scored queries.
    """
    n, hq, _ = q.shape
    rep = hq // k.shape[1]
    kq, vq = R.dequantize_slots(R.quantize_slots(k, v, fmt, k_perm, v_perm, k_clip, v_clip), fmt, k_perm, v_perm)
    pos_q = torch.arange(max(n - n_queries, 0), n).unsqueeze(1)
    pos_k = torch.arange(n).unsqueeze(0)
    fp = (pos_k < sink) | (pos_k == pos_q)
    causal = pos_k <= pos_q
    qs = q[pos_q[:, 0]].float()
    kf, vf = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    kqr, vqr = kq.repeat_interleave(rep, 1), vq.repeat_interleave(rep, 1)
    s_ref = torch.einsum("qhd,khd->hqk", qs, kf) * scale
    s_q = torch.where(fp, s_ref, torch.einsum("qhd,khd->hqk", qs, kqr) * scale)
    p_ref = torch.softmax(s_ref.masked_fill(~causal, float("-inf")), -1)
    p_q = torch.softmax(s_q.masked_fill(~causal, float("-inf")), -1)
    o_ref = torch.einsum("hqk,khd->qhd", p_ref, vf)
    o_q = torch.einsum("hqk,khd->qhd", p_q * fp, vf) + torch.einsum("hqk,khd->qhd", p_q * ~fp, vqr)
    return float((o_q - o_ref).double().pow(2).sum()), float(o_ref.double().pow(2).sum())


@dataclass(frozen=True)
class Candidate:
    """One calibrated candidate of one layer: its config, relative attention-output error and storage cost."""

    label: str
    layer: KVLayerConfig
    rel_err: float
    slot_bytes: int
    bits: float


def _rel_err(samples, fmt, scale, kp, vp, kc, vc, sink) -> float:
    num = den = 0.0
    for q, k, v in samples:
        a, b = attention_error(q, k, v, fmt, scale, kp, vp, kc, vc, sink)
        num, den = num + a, den + b
    return num / max(den, 1e-30)


def calibrate_layer(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], scale: float,
                    candidates: tuple[str, ...] = DEFAULT_CANDIDATES, clip_grid: tuple[float, ...] = CLIP_GRID,
                    reorder: bool = True, sink: int = 4) -> list[Candidate]:
    """Calibrate every candidate K/V config of one layer.

    Args:
        samples: per sequence (q [N, Hq, D], k [N, H, D], v [N, H, D]), post-RoPE.
        scale: softmax scale. reorder: compute within-head channel orders (only used when a group < D).
    Returns:
        one ``Candidate`` per label, in the given order.
    """
    d = samples[0][1].shape[-1]
    kall = torch.cat([s[1] for s in samples])
    vall = torch.cat([s[2] for s in samples])
    out = []
    for lab in candidates:
        fmt = default_format(lab, d)
        kp = channel_order(kall) if reorder and fmt.k_group < d else None
        vp = channel_order(vall) if reorder and fmt.v_group < d else None
        k_clip = min(clip_grid, key=lambda c: _rel_err(samples, fmt, scale, kp, vp, c, 1.0, sink))
        v_clip = min(clip_grid, key=lambda c: _rel_err(samples, fmt, scale, kp, vp, k_clip, c, sink))
        err = _rel_err(samples, fmt, scale, kp, vp, k_clip, v_clip, sink)
        lc = KVLayerConfig(fmt.k_bits, fmt.v_bits, fmt.k_group, fmt.v_group, k_clip, v_clip,
                           tuple(map(tuple, kp.tolist())) if kp is not None else None,
                           tuple(map(tuple, vp.tolist())) if vp is not None else None)
        out.append(Candidate(lab, lc, err, fmt.slot_bytes, fmt.bits_per_element()))
    return out


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Candidates not dominated in (slot_bytes, rel_err), cheapest first."""
    best, front = float("inf"), []
    for c in sorted(cands, key=lambda c: (c.slot_bytes, c.rel_err)):
        if c.rel_err < best:
            front.append(c)
            best = c.rel_err
    return front


def search_bits(per_layer: list[list[Candidate]], budget_bits: float, head_dim: int) -> list[Candidate]:
    """Minimise the summed relative attention error subject to mean packed bits/element <= budget_bits.

    Exact multiple-choice knapsack by DP over total slot bytes (all layers share head_dim).
    Raises ValueError if even the cheapest choice per layer exceeds the budget.
    """
    fronts = [pareto(c) for c in per_layer]
    cap = int(budget_bits * 2 * head_dim / 8 * len(fronts) + 1e-9)
    if sum(f[0].slot_bytes for f in fronts) > cap:
        raise ValueError(f"search_bits: budget {budget_bits} bits/elem is below the cheapest candidate "
                         f"({min(c.bits for f in per_layer for c in f):.3f})")
    inf = float("inf")
    dp = {0: (0.0, [])}  # total bytes -> (error, choices)
    for f in fronts:
        nxt: dict[int, tuple[float, list]] = {}
        for tot, (err, ch) in dp.items():
            for c in f:
                t = tot + c.slot_bytes
                if t <= cap and err + c.rel_err < nxt.get(t, (inf, None))[0]:
                    nxt[t] = (err + c.rel_err, ch + [c])
        dp = nxt
    return min(dp.values(), key=lambda x: x[0])[1]
