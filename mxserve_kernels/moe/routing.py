"""Routing metadata for the grouped GEMM, in torch (fixed shapes, no host sync: CUDA-graph and torch.compile safe).

Same output convention as vLLM's ``moe_align_block_size`` (which the vLLM plugin may feed instead): the (token,
slot) pairs ``r = t*K + k`` sorted by expert, each expert's run padded to a multiple of BLOCK_M with the sentinel
``T*K``; ``block_expert[b]`` is the expert of m-block b (-1 past the end); ``num_post`` the padded length.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # importable without Triton
    import triton

    from mxserve_kernels.moe import routing_kernels as _rk
    _HAS_TRITON = True
except Exception:  # pragma: no cover
    _HAS_TRITON = False


@dataclass
class Route:
    """Tile map of one MoE forward.

    Attributes:
        sorted_ids: int32 [max_padded] pair ids ``t*K + k`` grouped by expert, padding = ``num_valid``.
        block_expert: int32 [max_padded / BLOCK_M] local expert of each m-block, -1 for unused blocks.
        num_post: int32 [1] number of used rows (multiple of BLOCK_M).
        num_valid: T*K (the sentinel).
        block_m: BLOCK_M the padding used.
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_post: torch.Tensor
    num_valid: int
    block_m: int


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded length: each non-empty expert (at most min(E, T*K)) adds < BLOCK_M padding."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return max(block_m, -(-bound // block_m) * block_m)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              expert_map: torch.Tensor | None = None, *, use_triton: bool | None = None) -> Route:
    """Group (token, slot) pairs by expert and build the tile map.

    Args:
        topk_ids: [T, K] int32/int64 global expert ids.
        num_experts: E, local experts of the weights.
        block_m: BLOCK_M of the GEMM launches.
        expert_map: optional [E_global] int global -> local id, -1 = not on this rank (those pairs are dropped).
        use_triton: force (True) or forbid (False) the one-launch Triton kernel; default: used when T*K <=
            ``routing_kernels.MAX_PAIRS`` on CUDA (or under TRITON_INTERPRET=1). Both paths give identical output.
    Returns:
        Route.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"moe_align: topk_ids must be [T, K], got {list(topk_ids.shape)}")
    tk = topk_ids.numel()
    if use_triton is None:
        use_triton = (_HAS_TRITON and 0 < tk <= _rk.MAX_PAIRS
                      and (topk_ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))
    if use_triton:
        return _moe_align_triton(topk_ids, num_experts, block_m, expert_map)
    return moe_align_torch(topk_ids, num_experts, block_m, expert_map)


def _align_sizes(tk: int, num_experts: int, block_m: int) -> tuple[int, int]:
    max_rows = max_padded_rows(tk, num_experts, block_m)
    return max_rows, max_rows // block_m


@torch.library.custom_op("mxserve::moe_align", mutates_args=())
def moe_align_op(topk_ids: torch.Tensor, expert_map: torch.Tensor | None, num_experts: int,
                 block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw op (the one-launch Triton routing kernel; opaque to torch.compile, CUDA-graph safe): returns
    (sorted_ids [max_rows] int32, block_expert [max_rows / block_m] int32, num_post [1] int32)."""
    if not _HAS_TRITON:
        raise RuntimeError("mxserve::moe_align needs Triton; use moe_align_torch")
    dev = topk_ids.device
    tk = topk_ids.numel()
    max_rows, nblocks = _align_sizes(tk, num_experts, block_m)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nblocks, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    e_p2 = triton.next_power_of_2(num_experts + 1)
    scratch = torch.empty(e_p2, dtype=torch.int32, device=dev)
    emap = expert_map if expert_map is not None else scratch
    _rk.moe_align_kernel[(1,)](topk_ids.reshape(-1), emap, sorted_ids, block_expert, num_post, scratch, tk,
                               num_experts, max_rows, nblocks, HAS_MAP=expert_map is not None,
                               PAIRS=max(16, triton.next_power_of_2(tk)), E_P2=e_p2, BLOCK_M=block_m, FILL=1024,
                               BB=max(16, min(64, 4096 // e_p2)), num_warps=4)
    return sorted_ids, block_expert, num_post


@moe_align_op.register_fake
def _(topk_ids, expert_map, num_experts, block_m):
    max_rows, nblocks = _align_sizes(topk_ids.numel(), num_experts, block_m)
    new = topk_ids.new_empty
    return (new((max_rows,), dtype=torch.int32), new((nblocks,), dtype=torch.int32), new((1,), dtype=torch.int32))


def _moe_align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                      expert_map: torch.Tensor | None) -> Route:
    tk = topk_ids.numel()
    if tk > _rk.MAX_PAIRS:
        raise ValueError(f"moe_align: the Triton path takes at most {_rk.MAX_PAIRS} pairs, got {tk}")
    emap = expert_map.to(topk_ids.device).contiguous() if expert_map is not None else None
    sorted_ids, block_expert, num_post = torch.ops.mxserve.moe_align(topk_ids.contiguous(), emap, num_experts,
                                                                     block_m)
    return Route(sorted_ids, block_expert, num_post, tk, block_m)


def moe_align_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                    expert_map: torch.Tensor | None = None) -> Route:
    """``moe_align`` in plain torch ops (any batch size; the CPU path and the large-T path)."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    tk = flat.numel()
    if expert_map is not None:
        flat = expert_map.to(dev, torch.int64)[flat]
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # E = dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    pstart = pend - padded
    cstart = torch.cumsum(counts, 0) - counts
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, dropped pairs last
    se = flat[order]
    valid = se < num_experts
    sec = se.clamp(max=num_experts - 1)
    rank = torch.arange(tk, device=dev) - cstart[sec]
    max_rows = max_padded_rows(tk, num_experts, block_m)
    dest = torch.where(valid, pstart[sec] + rank, max_rows)
    sorted_ids = torch.full((max_rows + 1,), tk, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:max_rows]
    nblocks = max_rows // block_m
    bstart = torch.arange(nblocks, device=dev) * block_m
    be = torch.searchsorted(pend, bstart, right=True)
    block_expert = torch.where(be < num_experts, be, -1).to(torch.int32)
    num_post = pend[-1:].to(torch.int32)
    return Route(sorted_ids, block_expert, num_post, tk, block_m)


def route_from_vllm(sorted_ids: torch.Tensor, expert_ids: torch.Tensor, num_post: torch.Tensor, num_valid: int,
                    block_m: int) -> Route:
    """Wrap vLLM ``moe_align_block_size`` output (sorted_token_ids, expert_ids, num_tokens_post_padded)."""
    return Route(sorted_ids.to(torch.int32), expert_ids.to(torch.int32), num_post.reshape(1).to(torch.int32),
                 num_valid, block_m)
