"""Capture post-RoPE q/k/v of every attention layer of an HF causal LM, and the calibration driver that turns them
into a ``KVQuantConfig``.

Capture uses transformers' ``AttentionInterface``: a registered attention function records its inputs (post-RoPE,
which is what the paged cache stores) and then runs the stock sdpa implementation, so the model output is unchanged.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from mxserve.kvcache.calibrate import DEFAULT_CANDIDATES, Candidate, calibrate_layer, search_bits
from mxserve.kvcache.config import KVQuantConfig

logger = logging.getLogger("mxserve.kvcache")
_CAPTURE_NAME = "mxserve_kv_capture"


def capture_qkv(model: Any, input_ids: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, ...]]]:
    """Run ``model`` on each sequence and record per layer (q [N, Hq, D], k [N, H, D], v [N, H, D], scale).

    Args:
        model: a transformers causal LM (eager weights on CPU or GPU). input_ids: list of [N] int tensors.
    Returns:
        per layer, a list with one (q, k, v, scale) tuple per sequence (fp32, CPU).
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    records: list[tuple[torch.Tensor, ...]] = []

    def capture(module, query, key, value, attention_mask, scaling=None, **kw):
        # query [1, Hq, N, D], key/value [1, H, N, D]
        records.append((query[0].transpose(0, 1).float().cpu(), key[0].transpose(0, 1).float().cpu(),
                        value[0].transpose(0, 1).float().cpu(),
                        float(scaling if scaling is not None else query.shape[-1] ** -0.5)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register(_CAPTURE_NAME, capture)
    old = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE_NAME)
    per_layer: list[list[tuple[torch.Tensor, ...]]] = []
    try:
        dev = next(model.parameters()).device
        with torch.no_grad():
            for ids in input_ids:
                records.clear()
                model(input_ids=ids.reshape(1, -1).to(dev), use_cache=False)
                if not per_layer:
                    per_layer = [[] for _ in records]
                if len(records) != len(per_layer):
                    raise RuntimeError(f"capture_qkv: {len(records)} attention calls, expected {len(per_layer)}")
                for i, r in enumerate(records):
                    per_layer[i].append(r)
    finally:
        model.set_attn_implementation(old)
    return per_layer


def calibrate_model(per_layer: list[list[tuple[torch.Tensor, ...]]], *, label: str | None = None,
                    budget_bits: float | None = None, candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
                    sink: int = 4, window: int = 128, reorder: bool = True) -> KVQuantConfig:
    """Calibrate every layer and choose its bits: uniform ``label`` (e.g. "K2V1.5") or a search under
    ``budget_bits`` (mean packed bits/element incl. metadata) over ``candidates``.
    """
    if (label is None) == (budget_bits is None):
        raise ValueError("calibrate_model: give exactly one of label= or budget_bits=")
    cands = (label,) if label is not None else tuple(candidates)
    layers: list[list[Candidate]] = []
    for i, samples in enumerate(per_layer):
        scale = samples[0][3]
        layers.append(calibrate_layer([s[:3] for s in samples], scale, cands, reorder=reorder, sink=sink))
        logger.info("kv layer %d: %s", i, ", ".join(f"{c.label} err={c.rel_err:.4g} clip=({c.layer.k_clip},"
                                                   f"{c.layer.v_clip})" for c in layers[-1]))
    head_dim = per_layer[0][0][1].shape[-1]
    chosen = [c[0] for c in layers] if label is not None else search_bits(layers, budget_bits, head_dim)
    meta = {"method": "uniform" if label is not None else "mckp-dp-attn-error",
            "candidates": list(cands), "budget_bits": budget_bits,
            "avg_packed_bits": round(sum(c.bits for c in chosen) / len(chosen), 4),
            "layer_labels": [c.label for c in chosen], "layer_rel_err": [round(c.rel_err, 6) for c in chosen],
            "calib_sequences": len(per_layer[0]), "calib_tokens": int(sum(s[1].shape[0] for s in per_layer[0]))}
    return KVQuantConfig(layers=tuple(c.layer for c in chosen), sink_tokens=sink, window_tokens=window, meta=meta)
