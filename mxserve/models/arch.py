"""Checkpoint naming of the supported MoE architectures (HF hub layout: one tensor per expert projection).

Names are HF checkpoint names. ``layer_prefix(l)`` is ``model.layers.{l}``; a layer's MoE block is
``{layer_prefix}.{moe}``; expert ``e``'s projections are ``{moe}.experts.{e}.{gate|up|down}``; the router is
``{moe}.{router}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MoEArch:
    """Names and config fields of one MoE architecture."""

    arch: str                      # short name used on the CLI
    hf_architecture: str           # config.json "architectures"[0]
    model_type: str                # config.json "model_type"
    config_class: str              # transformers config class name
    moe: str = "mlp"               # MoE block module under the decoder layer
    router: str = "gate"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    shared_expert: str | None = None        # e.g. "shared_expert" (Qwen2-MoE), same gate/up/down names
    shared_expert_gate: str | None = None   # scalar gate of the shared expert (stays bf16)
    num_experts_field: str = "num_experts"
    top_k_field: str = "num_experts_per_tok"
    expert_inter_field: str = "moe_intermediate_size"
    attn_projs: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    @staticmethod
    def layer_prefix(layer: int) -> str:
        return f"model.layers.{layer}"

    def moe_prefix(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}.{self.moe}"

    def experts_prefix(self, layer: int) -> str:
        """Key used in ``MxMoEConfig.experts`` for this layer."""
        return f"{self.moe_prefix(layer)}.experts"

    def expert_proj(self, layer: int, expert: int, which: str) -> str:
        """HF module name of expert ``expert``'s projection ``which`` in {"gate", "up", "down"}."""
        return f"{self.experts_prefix(layer)}.{expert}.{getattr(self, which)}"

    def attn_proj(self, layer: int, proj: str) -> str:
        return f"{self.layer_prefix(layer)}.self_attn.{proj}"

    def shared_proj(self, layer: int, which: str) -> str:
        if self.shared_expert is None:
            raise ValueError(f"{self.arch} has no shared expert")
        return f"{self.moe_prefix(layer)}.{self.shared_expert}.{getattr(self, which)}"

    def geometry(self, cfg: Any) -> dict[str, int]:
        """Layer count, experts, top-k, hidden and expert intermediate size from an HF config (obj or dict)."""
        def get(k: str):
            for name in (k,) + _ALIASES.get(k, ()):
                v = cfg.get(name) if isinstance(cfg, dict) else getattr(cfg, name, None)
                if v is not None:
                    return v
            raise ValueError(f"{self.arch} config has no field {k!r}")
        return {"layers": get("num_hidden_layers"), "experts": get(self.num_experts_field),
                "top_k": get(self.top_k_field), "hidden": get("hidden_size"),
                "inter": get(self.expert_inter_field)}


# transformers 5 saves some fields under other names (Qwen3MoeConfig writes num_local_experts).
_ALIASES = {"num_experts": ("num_local_experts",), "num_local_experts": ("num_experts",)}

ARCHS: dict[str, MoEArch] = {
    "qwen3_moe": MoEArch("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen3MoeConfig"),
    "mixtral": MoEArch("mixtral", "MixtralForCausalLM", "mixtral", "MixtralConfig", moe="block_sparse_moe",
                       gate="w1", up="w3", down="w2", num_experts_field="num_local_experts",
                       expert_inter_field="intermediate_size"),
    "qwen2_moe": MoEArch("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", "Qwen2MoeConfig",
                         shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    "olmoe": MoEArch("olmoe", "OlmoeForCausalLM", "olmoe", "OlmoeConfig", expert_inter_field="intermediate_size"),
}


def arch_for_config(cfg: Any) -> MoEArch:
    """The MoEArch of an HF config (object or config.json dict); ValueError naming the type if unsupported."""
    mt = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    for a in ARCHS.values():
        if a.model_type == mt:
            return a
    raise ValueError(f"unsupported architecture model_type={mt!r}; supported: {sorted(ARCHS)}")
