"""Prefill / continuation attention: new tokens attend causally to themselves in full precision and to their cached
context dequantized from the packed pages.

v1 path (GPU and CPU), per request:
  * no cached context: one fused causal SDPA call on 4-D ``[1, Hq, n, D]`` views with ``enable_gqa`` (flash on CUDA
    bf16/fp16 and on CPU: O(n) memory). SDPA only considers its fused kernels for 4-D inputs: the earlier 3-D call
    always fell back to the math kernel, whose fp32 ``[Hq, n, n]`` scores (8.6 GB for 32 heads x 8k tokens, twice
    with the softmax) are invisible to vLLM's profile run and OOMed the first 8k prefill on the H200.
  * cached context (chunked prefill), or no fused kernel available: queries in row chunks so the score temporaries
    of one SDPA call stay under ``workspace_bytes`` (default ``WORKSPACE_BYTES``), with GQA folded into the query
    rows (``[1, H, G*rows, D]`` against ``[1, H, S, D]``: no repeat of K/V, mem-efficient eligible on CUDA).
Prefill is not captured in CUDA graphs, so the per-request loop is acceptable; a fused Triton continuation kernel is
future work (docs/kv-cache.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mxserve_kernels.attention import reference
from mxserve_kernels.attention.kv_format import KVSlotFormat
from mxserve_kernels.attention.kv_store import check_cache

WORKSPACE_BYTES = 512 << 20  # cap on one masked SDPA call's temporaries (fp32 scores + probabilities + mask)
_NO_KERNEL = ("No available kernel", "No viable backend")  # torch's messages (CUDA / CPU dispatch)
_FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def chunk_rows(hq: int, keys: int, workspace_bytes: int) -> int:
    """Query rows per masked SDPA call so that ~3 fp32 ``[Hq, rows, keys]`` buffers fit ``workspace_bytes``.

    Args:
        hq: Hq query heads. keys: keys attended by the call. workspace_bytes: budget.
    Returns:
        rows >= 1.
    """
    return max(1, workspace_bytes // (hq * max(keys, 1) * 4 * 3))


def _fused_causal(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Causal SDPA restricted to the fused (O(n) memory) kernels; None if none of them accepts the inputs.

    Args:
        q4: [1, Hq, n, D]; k4, v4: [1, H, n, D].
    Returns:
        [1, Hq, n, D] or None.
    """
    try:
        with sdpa_kernel(_FUSED):
            return F.scaled_dot_product_attention(q4, k4, v4, scale=scale, is_causal=True,
                                                  enable_gqa=q4.shape[1] != k4.shape[1])
    except RuntimeError as e:  # no fused kernel: raised before any allocation; OOM etc. propagate
        if not any(m in str(e) for m in _NO_KERNEL):
            raise
        return None


def _masked_chunked(q: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, c: int, scale: float,
                    workspace_bytes: int) -> torch.Tensor:
    """Queries at positions c..c+n-1 over keys 0..c+n-1 (causal), in row chunks bounded by ``workspace_bytes``.

    Args:
        q: [n, Hq, D]; kk, vv: [c+n, H, D] (context then new tokens), all in the compute dtype.
    Returns:
        [n, Hq, D].
    """
    n, hq, d = q.shape
    h = kk.shape[1]
    g = hq // h
    k4 = kk.transpose(0, 1).unsqueeze(0)  # [1, H, S, D]
    v4 = vv.transpose(0, 1).unsqueeze(0)
    out = torch.empty_like(q)
    rows = chunk_rows(hq, c + n, workspace_bytes)
    for qs in range(0, n, rows):
        qe = min(n, qs + rows)
        r, s_eff = qe - qs, c + qe  # keys past the chunk's last query are never read
        qh = q[qs:qe].view(r, h, g, d).permute(1, 2, 0, 3).reshape(1, h, g * r, d)  # row = g_idx * r + i
        kpos = torch.arange(s_eff, device=q.device)
        qpos = c + qs + torch.arange(r, device=q.device)
        keep = (kpos[None, :] <= qpos[:, None]).repeat(g, 1)  # [G*r, S]
        o = F.scaled_dot_product_attention(qh, k4[:, :, :s_eff], v4[:, :, :s_eff], attn_mask=keep, scale=scale)
        out[qs:qe] = o.view(h, g, r, d).permute(2, 0, 1, 3).reshape(r, hq, d)
    return out


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            ctx_lens: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                            fmt: KVSlotFormat, scale: float, k_perm: torch.Tensor | None = None,
                            v_perm: torch.Tensor | None = None, out: torch.Tensor | None = None,
                            workspace_bytes: int = WORKSPACE_BYTES) -> torch.Tensor:
    """Same contract as ``reference.paged_prefill_attention``.

    Args:
        q: [T, Hq, D]; k, v: [T, H, D] new tokens. cu_seqlens_q: [B+1] int. ctx_lens: [B] int cached tokens.
        cache: [pages, P, H, slot_bytes] uint8. block_table: [B, max_pages] int.
        out: optional [T, Hq, D] buffer. workspace_bytes: cap on one masked SDPA call's temporaries.
    Returns:
        [T, Hq, D] in q's dtype.
    """
    check_cache(cache, fmt, "paged_prefill_attention")
    t, hq, d = q.shape
    h = k.shape[1]
    if d != fmt.head_dim or k.shape != v.shape or k.shape[0] != t or hq % h:
        raise ValueError(f"paged_prefill_attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if workspace_bytes <= 0:
        raise ValueError(f"paged_prefill_attention: workspace_bytes must be > 0, got {workspace_bytes}")
    res = out if out is not None else torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    cl = ctx_lens.tolist()
    cdt = q.dtype
    for b in range(len(cu) - 1):
        s, e, c = cu[b], cu[b + 1], cl[b]
        n = e - s
        if n == 0:
            continue
        qb = q[s:e].to(cdt)
        if c == 0:
            o = _fused_causal(qb.transpose(0, 1).unsqueeze(0), k[s:e].to(cdt).transpose(0, 1).unsqueeze(0),
                              v[s:e].to(cdt).transpose(0, 1).unsqueeze(0), scale)
            if o is not None:
                res[s:e] = o[0].transpose(0, 1).to(res.dtype)
                continue
            kk, vv = k[s:e].to(cdt), v[s:e].to(cdt)
        else:
            kc, vc = reference.dequantize_slots(reference.gather_pages(cache, block_table[b], c), fmt, k_perm, v_perm)
            kk = torch.cat([kc.to(cdt), k[s:e].to(cdt)])
            vv = torch.cat([vc.to(cdt), v[s:e].to(cdt)])
        res[s:e] = _masked_chunked(qb, kk, vv, c, scale, workspace_bytes).to(res.dtype)
    return res
