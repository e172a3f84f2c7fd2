"""Launcher: quantize-and-store new K/V tokens into the packed paged cache (Triton; reference fallback on CPU).

Called from vLLM's ``do_kv_cache_update`` (its own splitting op, so no custom-op wrapper is needed here).
"""
from __future__ import annotations

import torch

from mxserve_kernels.attention import reference
from mxserve_kernels.attention.kv_format import TERNARY, KVSlotFormat, qmax_of

try:
    import triton
    from mxserve_kernels.attention.kv_store_kernels import kv_store_kernel
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency on GPU builds
    HAS_TRITON = False


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def tensor_constexprs(bits: float, group: int, d: int, prefix: str) -> dict:
    """Compile-time layout constants of one tensor (K or V) for the kernels (see ``_quant_one``)."""
    tern = bits == TERNARY
    per = 5 if tern else 8 // int(bits)
    nb = (group + 4) // 5 if tern else group // per
    ng = d // group
    return {f"{prefix}G": group, f"{prefix}NG": ng, f"{prefix}NGP": _pow2(ng), f"{prefix}PER": per,
            f"{prefix}NB": nb, f"{prefix}NBP": _pow2(nb), f"{prefix}PERP": _pow2(per),
            f"{prefix}BITS": 0 if tern else int(bits), f"{prefix}TERN": tern, f"{prefix}QMAX": qmax_of(bits)}


def check_cache(cache: torch.Tensor, fmt: KVSlotFormat, where: str) -> None:
    """Raise ValueError unless ``cache`` is a uint8 [pages, P, H, slot_bytes] tensor usable by the kernels."""
    if cache.dtype != torch.uint8 or cache.ndim != 4 or cache.shape[-1] != fmt.slot_bytes:
        raise ValueError(f"{where}: cache must be uint8 [pages, P, H, {fmt.slot_bytes}], got {cache.dtype} "
                         f"{list(cache.shape)}")
    if cache.stride(-1) != 1 or any(s % 2 for s in cache.stride()[:3]):
        raise ValueError(f"{where}: cache slots must be contiguous with even strides, got {cache.stride()}")


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVSlotFormat,
             k_perm: torch.Tensor | None = None, v_perm: torch.Tensor | None = None, k_clip: float = 1.0,
             v_clip: float = 1.0) -> None:
    """Quantize T tokens of K/V and write them into their slots, in place: cache[slot // P, slot % P] = pack(k, v).

    Args:
        cache: [pages, P, H, slot_bytes] uint8. k, v: [T, H, D] fp16/bf16/fp32 (last dim contiguous).
        slot_mapping: [T] int32/int64, negative = skip. k_perm, v_perm: [H, D] int32 or None.
        k_clip, v_clip: per-layer clip ratios.
    """
    check_cache(cache, fmt, "store_kv")
    t, h, d = k.shape
    if v.shape != k.shape or d != fmt.head_dim or cache.shape[2] != h or slot_mapping.shape[0] < t:
        raise ValueError(f"store_kv: k {list(k.shape)}, v {list(v.shape)}, slot_mapping "
                         f"{list(slot_mapping.shape)}, cache {list(cache.shape)} (head_dim {fmt.head_dim})")
    if not (HAS_TRITON and cache.is_cuda) and not _interpret():
        reference.store_kv(cache, k, v, slot_mapping[:t], fmt, k_perm, v_perm, k_clip, v_clip)
        return
    if t == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv: k and v need a contiguous last dim")
    meta = cache.view(torch.float16)
    kp = k_perm.to(torch.int32).contiguous() if k_perm is not None else slot_mapping
    vp = v_perm.to(torch.int32).contiguous() if v_perm is not None else slot_mapping
    kv_store_kernel[(t, h)](
        k, v, slot_mapping, cache, meta, kp, vp, float(k_clip), float(v_clip),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cache.stride(0), cache.stride(1), cache.stride(2), cache.shape[1],
        HAS_KPERM=k_perm is not None, HAS_VPERM=v_perm is not None, D=d,
        K_OFF=fmt.k_off, V_OFF=fmt.v_off, KM_OFF=fmt.k_meta_off, VM_OFF=fmt.v_meta_off,
        **tensor_constexprs(fmt.k_bits, fmt.k_group, d, "K"), **tensor_constexprs(fmt.v_bits, fmt.v_group, d, "V"))


def _interpret() -> bool:
    import os
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"
