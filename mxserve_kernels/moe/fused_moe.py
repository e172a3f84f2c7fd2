"""``fused_moe``: the MoE layer forward with one grouped-GEMM launch per projection (all precisions together)."""
from __future__ import annotations

import torch

from mxserve_kernels._common import configs
from mxserve_kernels.moe import reference
from mxserve_kernels._common.layout import OFF_UNIT
from mxserve_kernels.moe.grouped_gemm import MODE_DOWN, MODE_GATE_UP, dequant_bf16, grouped_gemm, triton_usable

# prefill: at >= this many rows per expert (T*K/E), integer experts are dequantized to bf16 once per forward and the
# GEMMs run on bf16 weights (tensor-core bound regime: the dequant's extra bytes are cheaper than in-loop dequant).
# H200, Qwen3-30B-A3B W4: in-loop 529 us at 16 rows/expert (T=256) and 1728 us at 64 (T=1024); the dequant costs
# ~470 us for the whole layer, bf16 GEMMs 2100 us at T=8192 -> crossover between 16 and 64 rows.
PREFILL_DEQUANT_ROWS = 48


def _prefill_weights(pw, rows_per_expert: float, x: torch.Tensor, enabled: bool):
    """bf16-dequantized projection for the prefill regime (16-bit activations only: fp32 keeps fp32 weights)."""
    if (enabled and rows_per_expert >= PREFILL_DEQUANT_ROWS and x.dtype != torch.float32 and pw.kinds_mask & ~1
            and (pw.k * pw.n) % OFF_UNIT == 0):
        return dequant_bf16(pw)
    return pw
from mxserve_kernels.moe.routing import Route, moe_align
from mxserve_kernels.moe.weights import MoEWeights


def moe_config(w: MoEWeights, num_tokens: int, top_k: int) -> dict[str, dict[str, int]]:
    """Launch configs ``{"w13": cfg, "w2": cfg}`` (same BLOCK_M) for T tokens: the tuned file's nearest T for each
    projection's dominant storage width (``configs.projection_bits``, read once per PackedWeights; the W4 entry when
    that width has none), else the documented default (``_common/configs.default_config``). When the two
    projections' entries disagree on BLOCK_M (one route serves both), both come from gate_up's entry (2x the bytes).
    """
    key = {"E": w.num_experts, "H": w.hidden, "I": w.inter}
    b13, b2 = configs.projection_bits(w.w13), configs.projection_bits(w.w2)
    t13 = configs.lookup(key, num_tokens, bits=b13)
    if t13 is not None:
        t2 = t13 if b2 == b13 else configs.lookup(key, num_tokens, bits=b2)
        if t2 is not None and t2["w2"]["BLOCK_M"] == t13["w13"]["BLOCK_M"]:
            return {"w13": t13["w13"], "w2": t2["w2"]}
        return {"w13": t13["w13"], "w2": t13["w2"]}
    d = configs.default_config(num_tokens * top_k / max(w.num_experts, 1))
    return {"w13": d, "w2": dict(d)}


def fused_moe(x: torch.Tensor, w: MoEWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              activation: str = "silu", expert_map: torch.Tensor | None = None,
              config: dict[str, dict[str, int]] | None = None, route: Route | None = None,
              prefill_dequant: bool = True) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = topk_ids[t,k].

    Args:
        x: [T, H] bf16/fp16/fp32.
        w: MoEWeights (experts may mix bf16 / int2 / int3 / int4 / int8 / nested).
        topk_weights: [T, K] fp32 router weights. topk_ids: [T, K] int32/int64 expert ids.
        activation: "silu" (SiLU-and-mul fused into the gate_up launch).
        expert_map: optional [E_global] global -> local id, -1 = not on this rank.
        config: launch configs (default: tuned JSON or the documented default).
        route: precomputed tile map (e.g. from vLLM's moe_align_block_size); BLOCK_M must match the config.
        prefill_dequant: allow the prefill path (>= PREFILL_DEQUANT_ROWS rows per expert: integer experts
            dequantized to a bf16 [E, K, N] scratch, then bf16 GEMMs) unless the config says ``"INLOOP": 1`` (the
            tuner measured in-loop dequant faster at that T).
    Returns:
        [T, H] x.dtype. On CPU without TRITON_INTERPRET=1 this is ``reference.fused_moe``.
    """
    reference._check(x, w, topk_weights, topk_ids, activation)
    if not triton_usable(x):
        return reference.fused_moe(x, w, topk_weights, topk_ids, activation=activation, expert_map=expert_map)
    t, k = topk_ids.shape
    if t == 0:
        return x.new_zeros((0, w.hidden))
    cfg = config or moe_config(w, t, k)
    if cfg["w13"]["BLOCK_M"] != cfg["w2"]["BLOCK_M"]:
        raise ValueError("fused_moe: config w13 and w2 must share BLOCK_M")
    if route is None:
        route = moe_align(topk_ids, w.num_experts, cfg["w13"]["BLOCK_M"], expert_map)
    r = t * k / max(w.num_experts, 1)
    deq = prefill_dequant and not cfg["w13"].get("INLOOP")  # tuned prefill configs may prefer in-loop dequant
    h = grouped_gemm(x, _prefill_weights(w.w13, r, x, deq), cfg["w13"], mode=MODE_GATE_UP, route=route,
                     a_div=k)  # [T*K, I]
    y = grouped_gemm(h, _prefill_weights(w.w2, r, x, deq), cfg["w2"], mode=MODE_DOWN, route=route,
                     topk_weights=topk_weights, zero_init=expert_map is not None)  # [T*K, H], router weights applied
    return y.view(t, k, w.hidden).sum(dim=1) if k > 1 else y.view(t, w.hidden)
