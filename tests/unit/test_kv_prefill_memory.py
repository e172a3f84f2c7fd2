"""Prefill memory bound (the 8k-prompt EngineDeadError of the K2V1.5 throughput bench): a request without cached
context must reach SDPA in a fused-kernel-eligible form (4-D, no explicit mask; a 3-D call always took the math
kernel and its fp32 [Hq, n, n] scores), and the masked (cached-context) path must keep each SDPA call's score
temporaries under the workspace budget; both must still match the fp32 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mxserve_kernels.attention import prefill
from mxserve_kernels.attention import reference as R
from mxserve_kernels.attention.kv_format import KVSlotFormat
from tests.tolerances import ATTENTION

D, H, HQ, P = 32, 2, 8, 4
FMT = KVSlotFormat(D, k_bits=2, v_bits=1.5, k_group=16, v_group=32)


def _batch(ctx: list[int], new: list[int], dtype=torch.float32, seed: int = 0):
    """Packed cache holding ``ctx[b]`` tokens per request (shuffled pages) + new-token q/k/v."""
    g = torch.Generator().manual_seed(seed)
    pages_per = max((c + P - 1) // P for c in ctx) + 1
    table = torch.randperm(len(ctx) * pages_per, generator=g).to(torch.int32).view(len(ctx), pages_per)
    cache = torch.zeros(len(ctx) * pages_per, P, H, FMT.slot_bytes, dtype=torch.uint8)
    for i, c in enumerate(ctx):
        pos = torch.arange(c)
        R.store_kv(cache, torch.randn(c, H, D, generator=g), torch.randn(c, H, D, generator=g),
                   table[i][pos // P].long() * P + pos % P, FMT)
    t = sum(new)
    q, k, v = (torch.randn(t, hh, D, generator=g).to(dtype) for hh in (HQ, H, H))
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu, torch.tensor(ctx, dtype=torch.int32), cache, table


class _Recorder:
    """Wraps F.scaled_dot_product_attention; with ``flash_only`` every unmasked call must run on flash."""

    def __init__(self, flash_only: bool):
        self.calls, self.flash_only, self.real = [], flash_only, F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, is_causal=False, **kw):
        self.calls.append((tuple(q.shape), tuple(k.shape), attn_mask is not None, is_causal))
        if self.flash_only and attn_mask is None:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises "No available kernel" if not eligible
                return self.real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)
        return self.real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_context_prefill_is_flash_eligible(monkeypatch, dtype):
    rec = _Recorder(flash_only=True)
    monkeypatch.setattr(prefill.F, "scaled_dot_product_attention", rec)
    q, k, v, cu, cl, cache, table = _batch([0, 0], [40, 23], dtype)
    out = prefill.paged_prefill_attention(q, k, v, cu, cl, cache, table, FMT, 0.2)
    assert len(rec.calls) == 2
    for qs, ks, masked, causal in rec.calls:
        assert len(qs) == 4 and qs[1] == HQ and ks[1] == H and causal and not masked
    ref = R.paged_prefill_attention(q.float(), k.float(), v.float(), cu, cl, cache, table, FMT, 0.2)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **ATTENTION[torch.float32])
    else:  # bf16 inputs: compare against the reference on the same bf16-rounded inputs, bf16 tolerance
        torch.testing.assert_close(out.float(), ref, **ATTENTION[torch.bfloat16])


def test_context_prefill_chunks_under_workspace(monkeypatch):
    rec = _Recorder(flash_only=False)
    monkeypatch.setattr(prefill.F, "scaled_dot_product_attention", rec)
    ctx, new = [13, 0, 29], [37, 5, 1]
    q, k, v, cu, cl, cache, table = _batch(ctx, new, seed=1)
    budget = HQ * (29 + 1) * 4 * 3 * 5  # ~5 rows per call for the longest request
    out = prefill.paged_prefill_attention(q, k, v, cu, cl, cache, table, FMT, 0.2, workspace_bytes=budget)
    ref = R.paged_prefill_attention(q, k, v, cu, cl, cache, table, FMT, 0.2)
    torch.testing.assert_close(out, ref, **ATTENTION[torch.float32])
    masked = [c for c in rec.calls if c[2]]
    assert len(masked) >= 37 // prefill.chunk_rows(HQ, 13 + 37, budget)  # request 0 really was split
    for qs, ks, _, _ in masked:
        assert len(qs) == 4 and qs[1] == ks[1] == H  # GQA folded into rows: K/V never repeated per q head
        score_bytes = HQ * (qs[2] // (HQ // H)) * ks[2] * 4 * 3
        assert score_bytes <= budget or qs[2] == HQ // H  # one query row is the floor


def test_fallback_without_fused_kernel_is_chunked_and_exact(monkeypatch):
    monkeypatch.setattr(prefill, "_FUSED", [SDPBackend.EFFICIENT_ATTENTION])  # not available on CPU
    rec = _Recorder(flash_only=False)
    monkeypatch.setattr(prefill.F, "scaled_dot_product_attention", rec)
    q, k, v, cu, cl, cache, table = _batch([0], [50], seed=2)
    budget = HQ * 50 * 4 * 3 * 8
    out = prefill.paged_prefill_attention(q, k, v, cu, cl, cache, table, FMT, 0.2, workspace_bytes=budget)
    torch.testing.assert_close(out, R.paged_prefill_attention(q, k, v, cu, cl, cache, table, FMT, 0.2),
                               **ATTENTION[torch.float32])
    assert sum(c[2] for c in rec.calls) >= 50 // 8  # the unfused call came back, then the chunked masked ones


def test_workspace_must_be_positive():
    q, k, v, cu, cl, cache, table = _batch([0], [3])
    with pytest.raises(ValueError, match="workspace_bytes"):
        prefill.paged_prefill_attention(q, k, v, cu, cl, cache, table, FMT, 0.2, workspace_bytes=0)
