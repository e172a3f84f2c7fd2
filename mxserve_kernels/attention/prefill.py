"""Prefill / continuation attention: new tokens attend causally to themselves in full precision and to their cached
context dequantized from the packed pages.

v1 path (GPU and CPU): per request, dequantize the context slots with torch ops (``reference.dequantize_slots``)
and run ``torch.nn.functional.scaled_dot_product_attention`` with an explicit causal-with-context mask. Prefill is
not captured in CUDA graphs, so the per-request loop is acceptable; a fused Triton continuation kernel is future
work (see docs/kv-cache.md). Requests without context should use flash-attention on the raw K/V (the vLLM backend
does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mxserve_kernels.attention import reference
from mxserve_kernels.attention.kv_format import KVSlotFormat
from mxserve_kernels.attention.kv_store import check_cache


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            ctx_lens: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                            fmt: KVSlotFormat, scale: float, k_perm: torch.Tensor | None = None,
                            v_perm: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``reference.paged_prefill_attention``.

    Args:
        q: [T, Hq, D]; k, v: [T, H, D] new tokens. cu_seqlens_q: [B+1] int. ctx_lens: [B] int cached tokens.
        cache: [pages, P, H, slot_bytes] uint8. block_table: [B, max_pages] int.
        out: optional [T, Hq, D] buffer.
    Returns:
        [T, Hq, D] in q's dtype.
    """
    check_cache(cache, fmt, "paged_prefill_attention")
    t, hq, d = q.shape
    h = k.shape[1]
    if d != fmt.head_dim or k.shape != v.shape or k.shape[0] != t or hq % h:
        raise ValueError(f"paged_prefill_attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    res = out if out is not None else torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    cl = ctx_lens.tolist()
    cdt = q.dtype if q.dtype != torch.float32 else torch.float32
    for b in range(len(cu) - 1):
        s, e, c = cu[b], cu[b + 1], cl[b]
        n = e - s
        if n == 0:
            continue
        if c > 0:
            kc, vc = reference.dequantize_slots(reference.gather_pages(cache, block_table[b], c), fmt, k_perm, v_perm)
            kk = torch.cat([kc.to(cdt), k[s:e].to(cdt)])
            vv = torch.cat([vc.to(cdt), v[s:e].to(cdt)])
        else:
            kk, vv = k[s:e].to(cdt), v[s:e].to(cdt)
        if c > 0:
            mask = torch.ones(n, c + n, dtype=torch.bool, device=q.device)
            mask[:, c:] = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
            kw = {"attn_mask": mask}
        else:  # no context: plain causal, so SDPA can take its flash path (no [Hq, n, n] score matrix)
            kw = {"is_causal": True}
        o = F.scaled_dot_product_attention(q[s:e].to(cdt).transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1),
                                           scale=scale, enable_gqa=hq != h, **kw)
        res[s:e] = o.transpose(0, 1).to(res.dtype)
    return res
