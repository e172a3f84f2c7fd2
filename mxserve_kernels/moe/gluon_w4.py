"""Launcher of the Gluon int4 decode down-projection prototype (``gluon_w4_kernels``; sm90 only, not wired into
``fused_moe``).

``gluon_w4_down(x, w, route, topk_weights)`` computes, like ``grouped_gemm(..., mode=MODE_DOWN)``,
``out[r] = topk_w[r] * (x[r] @ W_e^T)`` for every routed pair r of expert e, with every live expert of ``w`` plain
int4 at group size 128.
"""
from __future__ import annotations

import torch

from mxserve_kernels._common.layout import (
    F_BITS,
    F_GROUP,
    F_KIND,
    KIND_INT,
    KIND_NONE,
    NFIELDS,
    PackedWeights,
)
from mxserve_kernels.moe.routing import Route

BLOCK_M = 16  # the route's BLOCK_M (the kernel's BM)
BLOCK_N = 64  # output features per program
STEP_K = 128  # K rows per step


def gluon_available() -> bool:
    """True when Triton's Gluon (``triton.experimental.gluon``, Triton >= 3.5) and its Hopper ops import."""
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def check_weights(w: PackedWeights) -> None:
    """Raise ValueError naming the expert / field when ``w`` is not what the prototype computes: every expert int4
    (``KIND_INT``, 4 bits) with group size 128, or empty (``KIND_NONE``); N % 64 == 0 and K % 128 == 0."""
    if w.n % BLOCK_N or w.k % STEP_K:
        raise ValueError(f"gluon_w4_down: weight [N={w.n}, K={w.k}] needs N % {BLOCK_N} == 0 and K % {STEP_K} == 0")
    for e, row in enumerate(w.einfo.cpu().tolist()):
        kind, bits, g = row[F_KIND], row[F_BITS], row[F_GROUP]
        if kind == KIND_NONE:
            continue
        if kind != KIND_INT or bits != 4 or g != STEP_K:
            raise ValueError(f"gluon_w4_down: expert {e} is kind {kind} bits {bits} group {g} (einfo); the prototype "
                             f"takes plain int4 g128 experts only")


def gluon_w4_down(x: torch.Tensor, w: PackedWeights, route: Route, topk_weights: torch.Tensor, *,
                  checked: bool = False) -> torch.Tensor:
    """Down projection of routed pairs with the router weight applied (MODE 2 of ``grouped_gemm``).

    Args:
        x: [T*K, K_in] bf16 CUDA activations, one row per (token, slot) pair.
        w: the down projection ([N, K_in] per expert), every live expert int4 g128 (``check_weights``).
        route: ``routing.moe_align`` output with ``block_m == 16``.
        topk_weights: [T*K] (or [T, K]) router weights.
        checked: skip ``check_weights`` (it reads einfo on the host: call it once, outside CUDA-graph capture).
    Returns:
        [T*K, N] bf16; rows of pairs the route drops are left 0.
    """
    if not x.is_cuda or x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"gluon_w4_down: x must be a CUDA bf16 [R, {w.k}] tensor, got {x.dtype} "
                         f"{list(x.shape)} on {x.device}")
    if route.block_m != BLOCK_M:
        raise ValueError(f"gluon_w4_down: route BLOCK_M {route.block_m} != {BLOCK_M}")
    if topk_weights.numel() != route.num_valid:
        raise ValueError(f"gluon_w4_down: topk_weights has {topk_weights.numel()} elements, the route "
                         f"{route.num_valid} pairs")
    if not checked:
        check_weights(w)
    from mxserve_kernels.moe.gluon_w4_kernels import gluon_w4_down_kernel

    x = x.contiguous()
    tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    out = torch.zeros((route.num_valid, w.n), dtype=torch.bfloat16, device=x.device)
    grid = (route.block_expert.numel(), w.n // BLOCK_N)
    gluon_w4_down_kernel[grid](x, out, w.qw, w.meta, w.einfo, route.sorted_ids, route.block_expert, route.num_post,
                               tw, w.n, x.stride(0), out.stride(0), route.num_valid, K=w.k, NFIELDS=NFIELDS,
                               num_warps=4)
    return out
