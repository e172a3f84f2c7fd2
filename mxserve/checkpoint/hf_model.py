"""transformers models built from an ``HFCheckpoint`` (plain or mxmoe-quantized), without transformers' loader.

transformers 5 keeps each layer's experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H] = gate rows
then up rows, ``mlp.experts.down_proj`` [E, H, I]) and names the MoE block ``mlp`` for every supported arch, while
the hub layout has one tensor per expert projection under ``arch.moe``. This module converts hub -> memory for
one decoder layer at a time, so a driver can keep a single layer materialised (the rest stays on ``meta``).
"""
from __future__ import annotations

import torch

from mxserve.checkpoint.reader import HFCheckpoint


def hf_config(ckpt: HFCheckpoint):
    """The transformers config of ``ckpt`` without its quantization_config (we dequantize ourselves)."""
    from transformers import CONFIG_MAPPING
    d = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    cfg = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_skeleton(ckpt: HFCheckpoint, dtype: torch.dtype = torch.bfloat16):
    """``AutoModelForCausalLM`` on the ``meta`` device (no memory), rotary embedding materialised on CPU."""
    from transformers import AutoModelForCausalLM
    cfg = hf_config(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    rot = model.model.rotary_emb
    with torch.device("cpu"):
        model.model.rotary_emb = type(rot)(config=cfg)
    model.eval()
    return model


def _hub_name(ckpt: HFCheckpoint, mem_name: str) -> str:
    """In-memory parameter name -> hub checkpoint name (``.mlp.`` -> ``.{arch.moe}.``)."""
    return mem_name.replace(".mlp.", f".{ckpt.arch.moe}.", 1) if ckpt.arch.moe != "mlp" else mem_name


def _param(ckpt: HFCheckpoint, mem_name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    hub = _hub_name(ckpt, mem_name)
    a = ckpt.arch
    if hub.endswith(".experts.gate_up_proj") or hub.endswith(".experts.down_proj"):
        prefix = hub.rsplit(".", 1)[0]
        e, n, k = shape
        if hub.endswith("gate_up_proj"):
            ws = [torch.cat([ckpt.weight(f"{prefix}.{x}.{a.gate}", (n // 2, k), dtype),
                             ckpt.weight(f"{prefix}.{x}.{a.up}", (n // 2, k), dtype)]) for x in range(e)]
        else:
            ws = [ckpt.weight(f"{prefix}.{x}.{a.down}", (n, k), dtype) for x in range(e)]
        return torch.stack(ws)
    if ckpt.has(hub):
        t = ckpt.tensor(hub)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{ckpt.path}: tensor {hub!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t.to(dtype)
    if hub.endswith(".weight") and len(shape) == 2:
        return ckpt.weight(hub[: -len(".weight")], tuple(shape), dtype)  # quantized linear
    raise ValueError(f"{ckpt.path}: tensor {hub!r} is missing from the checkpoint")


def module_state_dict(ckpt: HFCheckpoint, module: torch.nn.Module, prefix: str, dtype: torch.dtype,
                      device=None) -> dict[str, torch.Tensor]:
    """State dict for ``module`` (skeleton, named ``prefix`` in the model) read from ``ckpt``."""
    sd = {}
    for name, p in module.state_dict(keep_vars=True).items():
        full = f"{prefix}.{name}" if prefix else name
        sd[name] = _param(ckpt, full, p.shape, dtype if p.is_floating_point() else p.dtype).to(device)
    return sd


def materialize(ckpt: HFCheckpoint, module: torch.nn.Module, prefix: str, dtype: torch.dtype, device) -> None:
    """Load real tensors for ``module`` from ``ckpt`` onto ``device`` (in place, replacing meta tensors)."""
    module.load_state_dict(module_state_dict(ckpt, module, prefix, dtype, device), strict=True, assign=True)


def release(module: torch.nn.Module) -> None:
    """Drop a module's tensors back to ``meta`` (frees host/GPU memory)."""
    module.to_empty(device="meta")


def load_model(ckpt: HFCheckpoint, device="cpu", dtype: torch.dtype = torch.float32):
    """The whole model, weights dequantized to ``dtype`` on ``device`` (tied lm_head handled)."""
    model = build_skeleton(ckpt, dtype)
    tied = bool(ckpt.config.get("tie_word_embeddings")) and not ckpt.has("lm_head.weight")
    for name, child in model.named_children():
        if name == "lm_head" and tied:
            continue
        for sub, mod in child.named_children():
            if sub == "rotary_emb":
                continue
            materialize(ckpt, mod, f"{name}.{sub}", dtype, device)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    elif isinstance(model.lm_head, torch.nn.Module) and model.lm_head.weight.is_meta:
        materialize(ckpt, model.lm_head, "lm_head", dtype, device)
    model.model.rotary_emb.to(device)
    return model.eval()
