"""End-to-end layer weights for the allocator: how much the model's output KL moves per unit of MoE-output error.

The block sensitivities (``sensitivity.block_errors``) measure each layer's MoE-output error in isolation; how
much of it reaches the logits differs per layer (later norms, attention and the residual stream attenuate or
amplify it), so a layer-local proxy can spend bits where the output does not care. ``layer_kld_probe`` measures,
for every MoE layer ``l``, the mean KL(bf16 || model with only layer l's experts at the ``probe`` scheme, RTN)
on a few calibration sequences. ``api.normalise_sensitivity(..., "kld")`` rescales layer l's block errors by
``kld_l / sum_b err_b(probe)`` so the additive objective is in (linearised) KL units.

Needs the whole model on ``device`` (one forward per MoE layer + one reference): meant for models that fit, e.g.
the demo models; large models use the layer-energy normalisation instead.
"""
from __future__ import annotations

import torch

from mxserve.checkpoint.hf_model import load_model
from mxserve.quant.primitives import quantize_rtn
from mxserve_kernels.formats import WeightScheme

PROBE_SEQS = 16
BATCH_SEQS = 4


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor, device) -> list[torch.Tensor]:
    return [torch.log_softmax(model(ids[b:b + BATCH_SEQS].to(device)).logits.float(), -1)
            for b in range(0, ids.shape[0], BATCH_SEQS)]


@torch.no_grad()
def layer_kld_probe(ckpt, ids: torch.Tensor, device, probe: WeightScheme) -> dict[int, float]:
    """Mean per-token KL divergence of the output with only one MoE layer's experts quantized.

    Args:
        ckpt: bf16 source checkpoint (``HFCheckpoint``-like).
        ids: [N, S] calibration token ids (the first ``PROBE_SEQS`` rows are used).
        device: torch device; fp32 on CPU, bf16 on CUDA.
        probe: scheme every expert of the probed layer is RTN-quantized to.
    Returns:
        {layer: mean KL (nats/token)} for every MoE layer.
    """
    device = torch.device(device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = load_model(ckpt, device=device, dtype=dtype)
    ids = ids[:PROBE_SEQS]
    ref = _logprobs(model, ids, device)
    out: dict[int, float] = {}
    for l, layer in enumerate(model.model.layers):
        ex = getattr(getattr(layer, "mlp", None), "experts", None)
        if ex is None:
            continue
        gu0, dn0 = ex.gate_up_proj.data.clone(), ex.down_proj.data.clone()
        ex.gate_up_proj.data.copy_(quantize_rtn(gu0.float(), probe)[2].to(dtype))
        ex.down_proj.data.copy_(quantize_rtn(dn0.float(), probe)[2].to(dtype))
        kl = n = 0.0
        for lr, lq in zip(ref, _logprobs(model, ids, device)):
            kl += float((lr.exp() * (lr - lq)).sum(-1).sum())
            n += lr.shape[0] * lr.shape[1]
        out[l] = kl / n
        ex.gate_up_proj.data.copy_(gu0)
        ex.down_proj.data.copy_(dn0)
    del model
    return out
