"""Per-(expert, block, scheme) sensitivity: MoE-block output error with only that block quantized.

MxMoE's ``layer_out_norm`` metric, computed without re-running the layer per expert: quantizing one block of
expert e changes the MoE output only on tokens routed to e, by ``r_te * (f_e^q(x_t) - f_e(x_t))`` (r = routing
weight), so all experts are scored from one pass over their own tokens. We report the squared Frobenius norm
(additive over independently quantized blocks, which is what the allocator's linear objective assumes).
Blocks: ``gate_up`` (gate and up quantized together, tied) and ``down``.
"""
from __future__ import annotations

from typing import Callable

import torch

BLOCKS = ("gate_up", "down")


def route(logits_or_gate: Callable[[torch.Tensor], tuple], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx [T, K], topk_weight [T, K]) from a transformers-5 router module (returns logits, w, idx)."""
    _, w, idx = logits_or_gate(h)
    return idx, w


def expert_tokens(topk_idx: torch.Tensor, topk_w: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices [T_e] routed to expert ``e`` and their routing weights [T_e]."""
    tok, slot = torch.where(topk_idx == e)
    return tok, topk_w[tok, slot]


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU expert: x [T, H], gate_up [2I, H], down [H, I] -> (activation a [T, I], output [T, H])."""
    g, u = (x @ gate_up.t()).chunk(2, dim=-1)
    a = act(g) * u
    return a, a @ down.t()


@torch.no_grad()
def block_errors(h: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, gate_up_q: torch.Tensor | None, down_q: torch.Tensor | None, act,
                 chunk: int = 8192) -> torch.Tensor:
    """Squared MoE-output error per expert for a quantized gate_up block and (separately) a quantized down block.

    Args:
        h: [T, H] MoE-block inputs; topk_idx/topk_w: [T, K] routing.
        gate_up, down: [E, 2I, H], [E, H, I] float reference weights.
        gate_up_q, down_q: same shapes, dequantized candidates (None: skip that block, error 0).
    Returns:
        [E, 2] float64: column 0 = gate_up quantized alone, column 1 = down quantized alone.
    """
    e_count = gate_up.shape[0]
    out = torch.zeros(e_count, 2, dtype=torch.float64)
    cdt = torch.float32
    for e in range(e_count):
        tok, r = expert_tokens(topk_idx, topk_w, e)
        if tok.numel() == 0:
            continue
        gu, dn = gate_up[e].to(cdt), down[e].to(cdt)
        for c0 in range(0, tok.numel(), chunk):
            x = h[tok[c0:c0 + chunk]].to(cdt)
            rr = r[c0:c0 + chunk].to(cdt).unsqueeze(-1)
            a, y = expert_ffn(x, gu, dn, act)
            if gate_up_q is not None:
                _, yq = expert_ffn(x, gate_up_q[e].to(cdt), dn, act)
                out[e, 0] += float(((yq - y) * rr).double().pow(2).sum())
            if down_q is not None:
                yq = a @ down_q[e].to(cdt).t()
                out[e, 1] += float(((yq - y) * rr).double().pow(2).sum())
    return out
