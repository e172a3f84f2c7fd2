"""Launcher: paged decode attention over packed K/V slots plus full-precision tokens (Triton, reference on CPU).

CUDA-graph safe: fixed grid (B, H_kv, num_splits + 1), no host sync, the split merge is plain torch ops.
"""
from __future__ import annotations

import torch

from mxserve_kernels.attention import reference
from mxserve_kernels.attention.kv_format import KVSlotFormat
from mxserve_kernels.attention.kv_store import HAS_TRITON, _interpret, _pow2, check_cache, tensor_constexprs

if HAS_TRITON:
    from mxserve_kernels.attention.decode_kernels import paged_decode_kernel

_MIN_DOT = 16  # tl.dot needs every dim >= 16


def _kernel_constexprs(fmt: KVSlotFormat) -> dict:
    out = {}
    for pre, bits, g in (("K", fmt.k_bits, fmt.k_group), ("V", fmt.v_bits, fmt.v_group)):
        c = tensor_constexprs(bits, g, fmt.head_dim, pre)
        for key in ("G", "PER", "NB", "BITS", "TERN", "QMAX"):
            out[pre + key] = c[pre + key]
    return out


def merge_partials(o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge split partials: o [B, Hq, S, D] (each normalised), lse [B, Hq, S] (-inf = empty) -> [B, Hq, D] fp32."""
    m = lse.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)                                # empty splits weigh 0
    den = w.sum(-1, keepdim=True)
    return (o * w.unsqueeze(-1)).sum(-2) / torch.where(den > 0, den, torch.ones_like(den))


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, pk_lo: torch.Tensor,
                           pk_hi: torch.Tensor, fp_k: torch.Tensor, fp_v: torch.Tensor, fp_len: torch.Tensor,
                           fmt: KVSlotFormat, scale: float, k_perm: torch.Tensor | None = None,
                           v_perm: torch.Tensor | None = None, num_splits: int = 8, block_n: int = 32,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """out[b] = softmax(q[b] . [K_packed[pk_lo:pk_hi]; fp_k[b,:fp_len]] * scale) @ [V_packed; fp_v].

    Args:
        q: [B, Hq, D] fp32/bf16/fp16 (Hq a multiple of H). cache: [pages, P, H, slot_bytes] uint8.
        block_table: [B, max_pages] int32. pk_lo, pk_hi: [B] int32 packed position range per request.
        fp_k, fp_v: [B, F, H, D] full-precision tokens; fp_len: [B] int32 (<= F).
        fmt: slot format; scale: softmax scale; k_perm, v_perm: [H, D] int32 channel orders or None.
        num_splits: split-K programs per (request, kv head) over the packed range; block_n: tokens per tile.
        out: optional [B, Hq, D] output buffer (q's dtype).
    Returns:
        [B, Hq, D] in q's dtype (fp32 on the reference path when q is fp32).
    """
    check_cache(cache, fmt, "paged_decode_attention")
    b, hq, d = q.shape
    h = cache.shape[2]
    if d != fmt.head_dim or hq % h or fp_k.shape[0] != b or fp_k.shape[2:] != (h, d) or fp_v.shape != fp_k.shape:
        raise ValueError(f"paged_decode_attention: q {list(q.shape)}, cache {list(cache.shape)}, "
                         f"fp_k {list(fp_k.shape)}, fp_v {list(fp_v.shape)} (head_dim {fmt.head_dim})")
    if not (HAS_TRITON and cache.is_cuda) and not _interpret():
        res = reference.paged_decode_attention(q, cache, block_table, pk_lo, pk_hi, fp_k, fp_v, fp_len, fmt, scale,
                                               k_perm, v_perm).to(q.dtype)
        if out is not None:
            out.copy_(res)
            return out
        return res
    qg = hq // h
    dp = max(_pow2(d), _MIN_DOT)
    bn = max(_pow2(block_n), _MIN_DOT)
    o_part = torch.empty(b, hq, num_splits + 1, dp, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, num_splits + 1, dtype=torch.float32, device=q.device)
    meta = cache.view(torch.float16)
    dummy = block_table
    if fp_k.stride(-1) != 1 or fp_v.stride() != fp_k.stride() or q.stride(-1) != 1:
        raise ValueError("paged_decode_attention: q / fp_k / fp_v need a contiguous last dim and equal fp strides")
    paged_decode_kernel[(b, h, num_splits + 1)](
        q, cache, meta, block_table, pk_lo, pk_hi, fp_k, fp_v, fp_len,
        k_perm if k_perm is not None else dummy, v_perm if v_perm is not None else dummy,
        o_part, lse, float(scale),
        q.stride(0), q.stride(1), block_table.stride(0), cache.stride(0), cache.stride(1), cache.stride(2),
        cache.shape[1], fp_k.stride(0), fp_k.stride(1), fp_k.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        HAS_KPERM=k_perm is not None, HAS_VPERM=v_perm is not None, QG=qg, QGP=max(_pow2(qg), _MIN_DOT),
        D=d, DP=dp, NS=num_splits, BN=bn, DOT_IEEE=q.dtype == torch.float32,
        K_OFF=fmt.k_off, V_OFF=fmt.v_off, KM_OFF=fmt.k_meta_off, VM_OFF=fmt.v_meta_off, **_kernel_constexprs(fmt))
    res = merge_partials(o_part[..., :d], lse)
    if out is None:
        return res.to(q.dtype)
    out.copy_(res)
    return out
