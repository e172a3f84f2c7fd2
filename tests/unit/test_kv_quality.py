"""The KV quality harness's building blocks (``mxserve.kvcache.quality``): mixed exact/dequantized attention, FP
zone masks, and the torch emulation of vLLM's int4_per_token_head baseline."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mxserve.kvcache import quality as Q
from tests.tolerances import ATTENTION


def test_hadamard_orthonormal():
    h = Q.hadamard(32)
    torch.testing.assert_close(h @ h.T, torch.eye(32), **ATTENTION[torch.float32])


def test_int4_per_token_head_error_bound():
    torch.manual_seed(0)
    x = torch.randn(64, 4, 32) * torch.linspace(0.1, 5, 32)
    signs = torch.randint(0, 2, (32,)).float() * 2 - 1
    rot = signs.unsqueeze(1) * Q.hadamard(32)
    xq = Q.int4_per_token_head(x, rot)
    y, yq = x @ rot, xq @ rot
    step = (y.amax(-1, keepdim=True) - y.amin(-1, keepdim=True)) / 15
    # asymmetric 4-bit with a rounded zero point: within one step, and exactly 16 levels at most per (token, head)
    assert bool(((y - yq).abs() <= step * (1 + 1e-4)).all())
    assert max(len(torch.unique(torch.round((yq[i, j] - yq[i, j].min()) / step[i, j], decimals=3)))
               for i in range(4) for j in range(4)) <= 16
    assert not torch.allclose(x, xq)


def test_fp_mask_zones():
    m = Q.fp_mask(8, sink=2, window=3, exact_current=True)
    assert m[7].tolist() == [True, True, False, False, False, True, True, True]
    assert m[3].tolist()[:4] == [True, True, True, True]
    assert Q.fp_mask(4, 0, 0, True).equal(torch.eye(4, dtype=torch.bool))
    assert not Q.fp_mask(4, 0, 0, False).any()


def test_mixed_attention_all_exact_is_causal_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    fp = torch.ones(10, 10, dtype=torch.bool)
    out = Q.mixed_attention(q, k, v, k * 0, v * 0, fp, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref, **ATTENTION[torch.float32])


def test_mixed_attention_past_only_reads_dequantized_past():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    kq, vq = k + 0.3 * torch.randn_like(k), v + 0.3 * torch.randn_like(v)
    out = Q.mixed_attention(q, k, v, kq, vq, Q.fp_mask(6, 0, 0, True), 0.5)
    i = 5  # last query: keys 0..4 dequantized, key 5 exact
    kk = torch.cat([kq[0, 0, :i], k[0, 0, i:i + 1]])
    vv = torch.cat([vq[0, 0, :i], v[0, 0, i:i + 1]])
    for h in range(2):
        p = torch.softmax(q[0, h, i] @ kk.T * 0.5, -1)
        torch.testing.assert_close(out[0, h, i], p @ vv, **ATTENTION[torch.float32])


def test_vllm_mask_prefill_block_exact_then_past_only():
    m = Q.vllm_mask(3)(5)
    assert m[:3, :3].all()
    assert m[3].tolist() == [False, False, False, True, False]
    assert m[4].tolist() == [False, False, False, False, True]
