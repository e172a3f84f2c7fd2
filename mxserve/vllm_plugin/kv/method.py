"""``MxKVCacheMethod``: installs the packed-KV backend, impl and spec on one vLLM ``Attention`` layer.

Lifecycle: vLLM's ``Attention.__init__`` calls ``quant_config.get_quant_method(layer, prefix)``; the mxmoe config
returns this method when its ``kv`` dict is set, and vLLM calls ``create_weights(layer)`` right after the layer's
impl exists. We swap ``layer.attn_backend`` / ``layer.impl`` for ``MxKVBackend`` / ``MxKVImpl`` and bind a per-instance
``get_kv_cache_spec`` returning ``MxKVSpec`` (the runners call the instance attribute).
"""
from __future__ import annotations

import re
from dataclasses import replace
from types import MethodType

import torch
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

from mxserve.kvcache.config import KVQuantConfig
from mxserve.vllm_plugin.kv import backend as B

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_index(prefix: str) -> int:
    """Decoder layer index from a module prefix like ``model.layers.7.self_attn.attn``."""
    m = _LAYER_RE.search(prefix + ".")
    if m is None:
        raise ValueError(f"MxKVCacheMethod: cannot find a layer index in attention prefix {prefix!r}")
    return int(m.group(1))


def shared_slot_bytes(cfg: KVQuantConfig, head_dim: int) -> int:
    """One slot size for every layer (vLLM needs one page size per KV cache group): the largest layer's."""
    return max(lc.slot_format(head_dim).slot_bytes for lc in cfg.layers)


class MxKVCacheMethod(BaseKVCacheMethod):
    """Args: quant_config (the mxmoe QuantizationConfig), kv (validated KVQuantConfig), prefix (layer name)."""

    def __init__(self, quant_config, kv: KVQuantConfig, prefix: str) -> None:
        super().__init__(quant_config)
        self.kv, self.prefix = kv, prefix

    def create_weights(self, layer: torch.nn.Module) -> None:
        super().create_weights(layer)
        B.register()
        lc = self.kv.layer(layer_index(self.prefix))
        d = layer.head_size
        fmt = lc.slot_format(d)
        slot = shared_slot_bytes(self.kv, d)
        impl = B.MxKVImpl(layer.num_heads, d, layer.impl.scale, layer.num_kv_heads)
        perm = lambda p: torch.tensor(p, dtype=torch.int32) if p is not None else None  # noqa: E731
        impl.bind(fmt, perm(lc.k_perm), perm(lc.v_perm), lc.k_clip, lc.v_clip)
        layer.impl = impl
        layer.attn_backend = B.MxKVBackend
        try:
            from vllm.v1.attention.backends.registry import AttentionBackendEnum
            layer.backend = AttentionBackendEnum.CUSTOM
        except ImportError:  # pragma: no cover
            pass

        def get_kv_cache_spec(self_layer, vllm_config):
            base = B.MxKVSpec(block_size=vllm_config.cache_config.block_size, num_kv_heads=self_layer.num_kv_heads,
                              head_size=slot, dtype=torch.uint8, slot_bytes=slot)
            return replace(base)
        layer.get_kv_cache_spec = MethodType(get_kv_cache_spec, layer)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # no checkpoint KV scales: quantization is dynamic per token; keep vLLM's defaults
        super().process_weights_after_loading(layer)
        # channel orders on the layer's device now, so no host->device copy can land inside a CUDA-graph capture
        ref = getattr(layer, "_k_scale", None)
        if isinstance(ref, torch.Tensor) and isinstance(layer.impl, B.MxKVImpl):
            layer.impl._to(ref.device)
