"""``mxmoe`` QuantizationConfig for vLLM 0.26: reads the checkpoint's ``quantization_config`` and dispatches layers.

Lifecycle (../shared/docs/vllm-0.26.md §2):
  1. process0: ``from_config(hf_config.quantization_config)`` (also reached through ``--hf-overrides
     '{"quantization_config": {...}}'``, or ``hf_overrides["quantization_config_file"|"quantization_config_dict_json"]``);
     then ``maybe_update_config(model_dir, hf_config)`` checks that the checkpoint holds exactly the tensors the plan
     names (``loading.check_checkpoint``). The config is pickled into workers: it holds only the GPU-free ``MxMoEConfig``.
  2. model construction: ``apply_vllm_mapper`` maps the plan's HF module names to vLLM names (unstacked mapper);
     ``get_quant_method(layer, prefix)`` returns
       * ``MxLinearMethod`` for quantized ``LinearBase`` layers (fused q/k/v and gate/up shards must share a scheme),
       * ``UnquantizedLinearMethod`` for bf16 linears and routers (``...gate``, ``...shared_expert_gate``),
       * ``MxMoEMethod`` for ``RoutedExperts`` with a plan entry (``None`` -> vLLM's unquantized MoE otherwise), or
         ``offload_method.OffloadMoEMethod`` (one shared ``OffloadRuntime`` per model) when the plan has an enabled
         ``offload`` section; that section also installs the compilation hook (MoE op outside CUDA graphs),
       * ``MxKVCacheMethod`` (kv package) for ``Attention`` when the plan has ``kv``; ``None`` otherwise and for
         embeddings / lm_head (unquantized).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from mxserve.config import MxMoEConfig
from mxserve.config.quant_config import QUANT_METHOD, ExpertPlan
from mxserve_kernels.formats import WeightScheme

logger = logging.getLogger("mxserve")

# Fused vLLM module -> the checkpoint shards it stacks (models add theirs via packed_modules_mapping).
DEFAULT_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
# Linear layers that always stay in the model dtype (routers and the shared-expert scalar gate).
UNQUANTIZED_LEAVES = ("gate", "shared_expert_gate")


class FusedSchemeError(ValueError):
    """Shards of one fused vLLM module (q/k/v, gate/up) carry different schemes in the plan."""


@register_quantization_config(QUANT_METHOD)
class MxMoEQuantConfig(QuantizationConfig):
    """vLLM view of an ``MxMoEConfig`` (picklable, GPU-free).

    Args:
        cfg: the parsed checkpoint ``quantization_config``; ``None`` means all-bf16 (``-q mxmoe`` on a bf16 model).
    """

    def __init__(self, cfg: MxMoEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MxMoEConfig()
        self._modules: dict[str, WeightScheme] = dict(self.cfg.modules)
        self._experts: dict[str, ExpertPlan] = dict(self.cfg.experts)
        self.kv_cfg = self._parse_kv(self.cfg.kv)
        self.offload_cfg = self._parse_offload(self.cfg.offload)
        self._offload_runtime = None

    @staticmethod
    def _parse_offload(off: dict | None):
        """Validate the plan's ``offload`` section at parse time (process 0); when enabled, wrap the platform's
        ``check_and_update_config`` (``offload_method.install_config_hook``: it runs later in the same
        ``VllmConfig.__post_init__``) so the MoE op becomes a CUDA-graph splitting op. Returns the config or None."""
        if off is None:
            return None
        from mxserve.scheduler.config import OffloadConfig
        cfg = OffloadConfig.from_dict(off)
        if cfg.enabled:
            from mxserve.vllm_plugin.offload_method import install_config_hook
            install_config_hook()
        return cfg

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_offload_runtime"] = None      # GPU state never travels with the config
        return state

    def offload_runtime(self):
        """The model's shared ``OffloadRuntime`` (created on first use, in the worker building the model)."""
        rt = self._offload_runtime
        if rt is None or (rt.cache is None and rt.plans is not self._experts):    # (re)built after name mapping
            from mxserve.vllm_plugin.offload_method import OffloadRuntime, layer_order
            rt = self._offload_runtime = OffloadRuntime(self.offload_cfg, layer_order(self._experts), self._experts)
        return rt

    @staticmethod
    def _parse_kv(kv: dict | None):
        """Validate the plan's ``kv`` section once, at parse time (process 0): a bad section is one KVConfigError
        naming the field before any model is built. Returns the ``KVQuantConfig`` or None."""
        if kv is None:
            return None
        from mxserve.kvcache.config import KVQuantConfig
        return KVQuantConfig.from_dict(kv)

    # ---- vLLM QuantizationConfig API ----------------------------------------------------------------------------
    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> "MxMoEQuantConfig":
        return cls(MxMoEConfig.from_dict(config))

    @classmethod
    def from_config_file(cls, path: str) -> "MxMoEQuantConfig":
        """``--hf-overrides '{"quantization_config_file": PATH}'``: a JSON file holding the quantization_config."""
        with open(path) as f:
            return cls.from_config(json.load(f))

    @classmethod
    def from_config_dict_json(cls, s: str) -> "MxMoEQuantConfig":
        """``--hf-overrides '{"quantization_config_dict_json": "<json>"}'``."""
        return cls.from_config(json.loads(s))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict, user_quant: str | None, hf_config=None) -> str | None:
        method = str((hf_quant_cfg or {}).get("quant_method", "")).lower()
        if method == QUANT_METHOD and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        return None

    def is_mxfp4_quant(self, prefix: str, layer: torch.nn.Module) -> bool:
        return False

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Map the plan's HF module names to vLLM names (idempotent: always maps from the checkpoint's names)."""
        self._modules = hf_to_vllm_mapper.apply_dict(dict(self.cfg.modules))
        self._experts = hf_to_vllm_mapper.apply_dict(dict(self.cfg.experts))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Check the checkpoint against the plan before any weight is loaded (local checkpoint directories only)."""
        from mxserve.vllm_plugin.loading import check_checkpoint

        if model_name and os.path.isdir(model_name):
            check_checkpoint(self.cfg, model_name, hf_config)
        if self.kv_cfg is not None and hf_config is not None:
            self.kv_cfg.validate_model(*kv_geometry(hf_config))

    # ---- scheme lookup --------------------------------------------------------------------------------------------
    def shard_names(self, prefix: str) -> list[str]:
        """vLLM (unstacked) module names of the checkpoint shards behind the vLLM module ``prefix``."""
        head, _, leaf = prefix.rpartition(".")
        packed = {**DEFAULT_PACKED, **(self.packed_modules_mapping or {})}
        if leaf in packed:
            return [f"{head}.{s}" if head else s for s in packed[leaf]]
        return [prefix]

    def linear_scheme(self, prefix: str) -> WeightScheme:
        """The one scheme of the (possibly fused) linear ``prefix``; FusedSchemeError naming the shards otherwise."""
        if prefix.rpartition(".")[2] in UNQUANTIZED_LEAVES:
            return WeightScheme(bits=16)
        shards = self.shard_names(prefix)
        schemes = {s: self._modules.get(s, self.cfg.default_scheme) for s in shards}
        if len(set(schemes.values())) > 1:
            detail = ", ".join(f"{s}={sc.name}" for s, sc in schemes.items())
            raise FusedSchemeError(
                f"mxmoe: the shards of fused module {prefix!r} have different schemes ({detail}); vLLM stores a fused "
                "module as one tensor, so q/k/v and gate/up must share a scheme: re-quantize with a shared scheme")
        return next(iter(schemes.values()))

    def expert_plan(self, prefix: str) -> ExpertPlan | None:
        return self._experts.get(prefix)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.fused_moe import RoutedExperts
        from vllm.model_executor.layers.linear import LinearBase
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        from mxserve.vllm_plugin import unquantized as U

        if isinstance(layer, LinearBase):
            scheme = self.linear_scheme(prefix)
            if scheme.bits == 16:
                return U.CountedUnquantizedLinearMethod(prefix, self.cfg)
            from mxserve.vllm_plugin.linear_method import MxLinearMethod
            return MxLinearMethod(scheme, prefix, self.shard_names(prefix), plan_cfg=self.cfg)
        if isinstance(layer, RoutedExperts):
            plan = self.expert_plan(prefix)
            if plan is None:
                return None
            if self.offload_cfg is not None and self.offload_cfg.enabled:
                from mxserve.vllm_plugin.offload_method import OffloadMoEMethod, forward_context
                ctx = forward_context()
                return OffloadMoEMethod(plan, prefix, layer.moe_config, self.offload_runtime(), plan_cfg=self.cfg,
                                        forward_context=ctx)
            from mxserve.vllm_plugin.moe_method import MxMoEMethod
            return MxMoEMethod(plan, prefix, layer.moe_config, plan_cfg=self.cfg)
        if isinstance(layer, VocabParallelEmbedding):
            return U.CountedUnquantizedEmbeddingMethod(prefix, self.cfg)
        return self._kv_method(layer, prefix)

    def _kv_method(self, layer: torch.nn.Module, prefix: str):
        """Attention layers get the KV package's ``MxKVCacheMethod`` when the plan has a ``kv`` section."""
        from vllm.model_executor.layers.attention.attention import Attention
        if isinstance(layer, Attention) and self.cfg.kv is not None:
            from mxserve.vllm_plugin.kv.method import MxKVCacheMethod
            return MxKVCacheMethod(self, self.kv_cfg, prefix)
        return None

    def __repr__(self) -> str:
        return (f"MxMoEQuantConfig(default={self.cfg.default_scheme.name}, modules={len(self.cfg.modules)}, "
                f"moe_layers={len(self.cfg.experts)})")


def register() -> None:
    """Called by ``mxserve.vllm_plugin.register()``; importing this module already registered ``mxmoe``."""
    return None


def kv_geometry(hf_config) -> tuple[int, int, int]:
    """(decoder layers, kv heads, head_dim) of an HF config (object or dict) for ``KVQuantConfig.validate_model``."""
    get = (lambda k: hf_config.get(k)) if isinstance(hf_config, dict) else (lambda k: getattr(hf_config, k, None))
    heads = get("num_attention_heads")
    head_dim = get("head_dim") or get("hidden_size") // heads
    return int(get("num_hidden_layers")), int(get("num_key_value_heads") or heads), int(head_dim)


def plan_summary(cfg: MxMoEConfig) -> dict[str, Any]:
    """Scheme histogram of a plan (for logs and docs): {scheme name: count of weights}."""
    hist: dict[str, int] = {}
    for s in cfg.modules.values():
        hist[s.name] = hist.get(s.name, 0) + 1
    for p in cfg.experts.values():
        for s in (*p.gate_up, *p.down):
            hist[s.name] = hist.get(s.name, 0) + 1
    return hist
