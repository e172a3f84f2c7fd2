"""Batched sensitivity equals re-running the whole MoE block with only that block quantized; router stats."""
from __future__ import annotations

import torch

from mxserve.quant.router_stats import RouterStats
from mxserve.quant.sensitivity import block_errors, expert_ffn

E, H, I, T, K = 4, 32, 16, 64, 2


def moe_out(h, idx, w, gu, dn):
    y = torch.zeros(h.shape[0], H, dtype=torch.float64)
    for t in range(h.shape[0]):
        for k in range(K):
            e = int(idx[t, k])
            y[t] += w[t, k].double() * expert_ffn(h[t:t + 1], gu[e], dn[e], torch.nn.functional.silu)[1][0].double()
    return y


def test_block_errors_equal_full_moe_rerun():
    h = torch.randn(T, H)
    logits = torch.randn(T, E)
    w, idx = torch.softmax(logits, -1).topk(K, -1)
    gu, dn = torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    gu_q, dn_q = gu + 0.01 * torch.randn_like(gu), dn + 0.01 * torch.randn_like(dn)
    got = block_errors(h, idx, w, gu, dn, gu_q, dn_q, torch.nn.functional.silu)
    ref_y = moe_out(h, idx, w, gu, dn)
    for e in range(E):
        g2 = gu.clone(); g2[e] = gu_q[e]
        d2 = dn.clone(); d2[e] = dn_q[e]
        want_gu = float((moe_out(h, idx, w, g2, dn) - ref_y).pow(2).sum())
        want_dn = float((moe_out(h, idx, w, gu, d2) - ref_y).pow(2).sum())
        assert abs(float(got[e, 0]) - want_gu) <= 1e-4 * want_gu
        assert abs(float(got[e, 1]) - want_dn) <= 1e-4 * want_dn


def test_router_stats_tokens_per_expert():
    s = RouterStats()
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    s.update(5, idx, 4)
    assert s.frequency(5).tolist() == [1.0, 0.5, 0.25, 0.25]
    assert s.tokens_per_expert(5, 8) == [8, 4, 2, 2]
