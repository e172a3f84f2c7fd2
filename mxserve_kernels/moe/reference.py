"""Pure-PyTorch MoE reference (same signature as ``moe.fused_moe``): dequantize each expert in fp32 from the runtime
layout, loop over experts, weighted sum. Also the CPU runtime path."""
from __future__ import annotations

import torch

from mxserve_kernels._common.layout import dequant_expert
from mxserve_kernels.moe.weights import MoEWeights


def _check(x: torch.Tensor, w: MoEWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
           activation: str) -> None:
    if activation != "silu":
        raise ValueError(f"fused_moe: activation {activation!r} not supported (only 'silu')")
    if x.dim() != 2 or x.shape[1] != w.hidden:
        raise ValueError(f"fused_moe: x must be [T, {w.hidden}], got {list(x.shape)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"fused_moe: topk_ids {list(topk_ids.shape)} and topk_weights "
                         f"{list(topk_weights.shape)} must both be [T={x.shape[0]}, K]")


def fused_moe(x: torch.Tensor, w: MoEWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              activation: str = "silu", expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t,k].

    Args:
        x: [T, H]. w: MoEWeights. topk_weights: [T, K] fp32. topk_ids: [T, K] int.
        expert_map: optional [E_global] global -> local id (-1: not on this rank, contributes 0).
    Returns:
        [T, H] x.dtype (computed in fp32).
    """
    _check(x, w, topk_weights, topk_ids, activation)
    ids = topk_ids.to(torch.int64)
    if expert_map is not None:
        ids = expert_map.to(ids.device, torch.int64)[ids]
    xf = x.to(torch.float32)
    out = torch.zeros(x.shape[0], w.hidden, dtype=torch.float32, device=x.device)
    inter = w.inter
    for e in range(w.num_experts):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        w13 = dequant_expert(w.w13, e)  # [2I, H]
        h = xf[tok] @ w13.t()
        a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        y = a @ dequant_expert(w.w2, e).t()  # [n, H]
        out.index_add_(0, tok, y * topk_weights[tok, slot].to(torch.float32)[:, None])
    return out.to(x.dtype)
