"""Launcher: paged decode attention over packed K/V slots plus full-precision tokens (Triton, reference on CPU).

CUDA-graph safe: fixed grid (B, H_kv, num_splits + 1) that depends on the batch shape only, no host sync; the
split merge is a second Triton launch (``merge_kernel``) writing straight into ``out``.
"""
from __future__ import annotations

import torch

from mxserve_kernels.attention import reference
from mxserve_kernels.attention.kv_format import KVSlotFormat
from mxserve_kernels.attention.kv_store import HAS_TRITON, _interpret, _pow2, check_cache, tensor_constexprs

if HAS_TRITON:
    from mxserve_kernels.attention.decode_kernels import merge_kernel, paged_decode_kernel

_MIN_DOT = 16  # tl.dot needs every dim >= 16
DEFAULT_BLOCK_N = 32  # H200 sweep (docs/results/2026-11-22_h200_session4.md): block 32 / 4 warps best in all 12 rows
RAW_ASM_BLOCK_N = 64  # "raw_asm" (session 5 quick sweep, docs/results/2026-11-22_h200_session5.md): block 64 /
#                       4 warps best in 5 of 6 A3B rows (8k x 32 K2V1.5 0.231 ms vs 0.250 ms at block 32)
DEFAULT_NUM_WARPS = 4  # (at block 64, 4 warps spill for K4V2: 225-255 regs/thread; 8 warps were the old default)
_TARGET_PROGRAMS_PER_SM = 8  # same sweep: ~8 programs per SM picks the best split count (or within 2 %)
# Packed-split implementations: "unpack" = dequantize every element then dot (the session-4 kernel, any format);
# "raw" = dot on the raw codes, scale/zero on the scores (2/4-bit and ternary K and V); "raw_asm" = "raw" with the
# unpack in packed PTX (CUDA, bf16/fp16 q). None picks ``default_path``.
PATHS = ("unpack", "raw", "raw_asm")
_RAW_BITS = (2, 4, 1.5)


def _tensor_constexprs(bits: float, group: int, d: int, pre: str) -> dict:
    """Layout constants of K or V for the decode kernel (see the module docstring of ``decode_kernels``).

    NB = code bytes of the whole head, NBT = NB padded to a power of two (>= 16, a tl.dot dim), PM = sub-codes per
    byte in the main expanded tile (ternary: digits 0..3; digit 4 is the extra tile), MP = meta halves padded.
    """
    c = tensor_constexprs(bits, group, d, pre)
    ng, nbg, per = d // group, c[pre + "NB"], c[pre + "PER"]
    nb = ng * nbg
    return {pre + "G": group, pre + "NG": ng, pre + "NBG": nbg, pre + "NB": nb, pre + "NBT": max(_pow2(nb), _MIN_DOT),
            pre + "PER": per, pre + "PM": 4 if c[pre + "TERN"] else per, pre + "MP": _pow2(2 * ng),
            pre + "BITS": c[pre + "BITS"], pre + "TERN": c[pre + "TERN"], pre + "QMAX": c[pre + "QMAX"]}


def _kernel_constexprs(fmt: KVSlotFormat) -> dict:
    return {**_tensor_constexprs(fmt.k_bits, fmt.k_group, fmt.head_dim, "K"),
            **_tensor_constexprs(fmt.v_bits, fmt.v_group, fmt.head_dim, "V")}


def auto_num_splits(batch: int, num_kv_heads: int, device: torch.device | None = None) -> int:
    """Split count so that B * H_kv * splits fills the GPU ~8 programs deep (a pure function of the batch shape, so
    CUDA-graph safe). Power of two in [1, 64]."""
    sms = 4  # CPU (TRITON_INTERPRET): keep the grid small
    if device is not None and device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = _TARGET_PROGRAMS_PER_SM * sms / max(batch * num_kv_heads, 1)
    return max(1, min(64, _pow2(int(want + 0.5))))


def raw_supported(fmt: KVSlotFormat) -> bool:
    """Whether the raw-code path handles ``fmt``: 2/4-bit or ternary K and V, V codes at an even byte offset."""
    return fmt.k_bits in _RAW_BITS and fmt.v_bits in _RAW_BITS and fmt.v_off % 2 == 0


def default_path(fmt: KVSlotFormat, q_dtype: torch.dtype, on_cuda: bool) -> str:
    """"raw_asm" where it can run (CUDA, not interpreted, bf16/fp16 q, ``raw_supported``), else "unpack"."""
    if on_cuda and not _interpret() and q_dtype in (torch.bfloat16, torch.float16) and raw_supported(fmt):
        return "raw_asm"
    return "unpack"


def _check_path(path: str, fmt: KVSlotFormat, q: torch.Tensor) -> None:
    if path not in PATHS:
        raise ValueError(f"paged_decode_attention: path={path!r} not in {PATHS}")
    if path != "unpack" and not raw_supported(fmt):
        raise ValueError(f"paged_decode_attention: path={path!r} needs 2/4-bit or ternary K and V at an even "
                         f"V offset, got {fmt.label} (v_off {fmt.v_off})")
    if path == "raw_asm" and (_interpret() or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError(f"paged_decode_attention: path='raw_asm' needs CUDA (not TRITON_INTERPRET) and bf16/fp16 "
                         f"q, got {q.dtype} on {q.device}")


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The kernel indexes fp_v with fp_k's strides: they must agree on every dim of size > 1 (a size-1 dim is only
    indexed at 0, and torch keeps any stride there: ``x[:1].contiguous()`` of a row of a fused qkv buffer returns
    the view itself, so one decode token's k and v rows differ in stride(0) -- session 6, vLLM, B = 1 step)."""
    return a.shape == b.shape and all(n <= 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, pk_lo: torch.Tensor,
                           pk_hi: torch.Tensor, fp_k: torch.Tensor, fp_v: torch.Tensor, fp_len: torch.Tensor,
                           fmt: KVSlotFormat, scale: float, k_perm: torch.Tensor | None = None,
                           v_perm: torch.Tensor | None = None, num_splits: int | None = None,
                           block_n: int | None = None, out: torch.Tensor | None = None,
                           num_warps: int = DEFAULT_NUM_WARPS, path: str | None = None) -> torch.Tensor:
    """out[b] = softmax(q[b] . [K_packed[pk_lo:pk_hi]; fp_k[b,:fp_len]] * scale) @ [V_packed; fp_v].

    Args:
        q: [B, Hq, D] fp32/bf16/fp16 (Hq a multiple of H). cache: [pages, P, H, slot_bytes] uint8.
        block_table: [B, max_pages] int32. pk_lo, pk_hi: [B] int32 packed position range per request.
        fp_k, fp_v: [B, F, H, D] full-precision tokens; fp_len: [B] int32 (<= F).
        fmt: slot format; scale: softmax scale; k_perm, v_perm: [H, D] int32 channel orders or None.
        num_splits: split-K programs per (request, kv head) over the packed range (None: ``auto_num_splits``,
            a function of B and H only); block_n: tokens per tile (rounded up to a power of two >= 16; default 64
            for "raw_asm", else 32); num_warps: per program.
        out: optional [B, Hq, D] output buffer (any float dtype, last dim contiguous).
        path: packed-split implementation, one of ``PATHS`` (None: ``default_path``); ignored on the CPU reference.
    Returns:
        [B, Hq, D] in q's dtype (fp32 on the reference path when q is fp32), or ``out``.
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
    if fp_k.stride(-1) != 1 or not _same_strides(fp_k, fp_v) or q.stride(-1) != 1:
        raise ValueError(f"paged_decode_attention: q / fp_k / fp_v need a contiguous last dim and equal fp strides "
                         f"(q {q.stride()}, fp_k {fp_k.stride()}, fp_v {fp_v.stride()})")
    path = path if path is not None else default_path(fmt, q.dtype, q.is_cuda)
    _check_path(path, fmt, q)
    if block_n is None:
        block_n = RAW_ASM_BLOCK_N if path == "raw_asm" else DEFAULT_BLOCK_N
    bn = max(_pow2(block_n), _MIN_DOT)
    ns = num_splits if num_splits is not None else auto_num_splits(b, h, q.device)
    if ns < 1:
        raise ValueError(f"paged_decode_attention: num_splits={ns} must be >= 1")
    if out is None:
        out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"paged_decode_attention: out {list(out.shape)} stride {out.stride()} must be "
                         f"{list(q.shape)} with a contiguous last dim")
    if b == 0:
        return out
    qg = hq // h
    o_part = torch.empty(b, hq, ns + 1, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, ns + 1, dtype=torch.float32, device=q.device)
    meta = cache.view(torch.float16)
    dummy = block_table
    paged_decode_kernel[(b, h, ns + 1)](
        q, cache, meta, block_table, pk_lo, pk_hi, fp_k, fp_v, fp_len,
        k_perm if k_perm is not None else dummy, v_perm if v_perm is not None else dummy,
        o_part, lse, float(scale), ns,
        q.stride(0), q.stride(1), block_table.stride(0), cache.stride(0), cache.stride(1), cache.stride(2),
        cache.shape[1], fp_k.stride(0), fp_k.stride(1), fp_k.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        HAS_KPERM=k_perm is not None, HAS_VPERM=v_perm is not None, QG=qg, QGP=max(_pow2(qg), _MIN_DOT),
        D=d, DP=max(_pow2(d), _MIN_DOT), BN=bn, FBN=_MIN_DOT, DOT_IEEE=q.dtype == torch.float32,
        K_OFF=fmt.k_off, V_OFF=fmt.v_off, KM_OFF=fmt.k_meta_off, VM_OFF=fmt.v_meta_off, **_kernel_constexprs(fmt),
        RAW=path != "unpack", ASM=path == "raw_asm", num_warps=num_warps)
    merge_kernel[(b, hq)](o_part, lse, out, ns + 1, o_part.stride(0), o_part.stride(1), o_part.stride(2),
                          lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                          D=d, DP=_pow2(d), SP=_pow2(ns + 1), num_warps=1 if d <= 128 else 2)
    return out
