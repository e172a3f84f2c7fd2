"""The ``quantization_config`` an mxmoe checkpoint carries in config.json (schema version 1).

JSON shape::

    {"quant_method": "mxmoe", "version": 1,
     "default_scheme": "bf16",                       # any linear not named below
     "modules": {"model.layers.0.self_attn.q_proj": "int8_g128_asym", ...},   # dense linears, HF names
     "experts": {"model.layers.0.mlp.experts": {"gate_up": ["int4_g128_asym", ...],   # one per expert
                                                  "down":    ["int2_g128_asym", ...]}},
     "kv": null | {...},          # KV-cache quantization (kv-cache issue), free-form dict validated there
     "offload": null | {...},     # expert offloading (offload issue)
     "meta": {...}}               # provenance: method, budget, calibration, true average bits...

Scheme names are ``mxserve_kernels.formats.WeightScheme`` names. Module names are the checkpoint's (HF) names,
without the tensor suffix; gate and up of an expert always share one scheme ("gate_up"). Routers stay bf16.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mxserve_kernels.formats import WeightScheme

CONFIG_VERSION = 1
QUANT_METHOD = "mxmoe"


class QuantConfigError(ValueError):
    """A malformed mxmoe quantization_config; the message names the offending field."""


@dataclass(frozen=True)
class ExpertPlan:
    """Schemes of one MoE layer's experts: ``gate_up[e]`` and ``down[e]`` for expert e."""

    gate_up: tuple[WeightScheme, ...]
    down: tuple[WeightScheme, ...]

    def __post_init__(self) -> None:
        if len(self.gate_up) != len(self.down):
            raise QuantConfigError(f"ExpertPlan: {len(self.gate_up)} gate_up schemes but {len(self.down)} down schemes")

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)


def _scheme(name: Any, where: str) -> WeightScheme:
    if not isinstance(name, str):
        raise QuantConfigError(f"quantization_config.{where}: expected a scheme name string, got {name!r}")
    try:
        return WeightScheme.parse(name)
    except ValueError as e:
        raise QuantConfigError(f"quantization_config.{where}: {e}") from None


@dataclass(frozen=True)
class MxMoEConfig:
    """Parsed, validated mxmoe ``quantization_config`` (picklable, GPU-free)."""

    default_scheme: WeightScheme = WeightScheme(bits=16)
    modules: dict[str, WeightScheme] = field(default_factory=dict)
    experts: dict[str, ExpertPlan] = field(default_factory=dict)
    kv: dict | None = None
    offload: dict | None = None
    meta: dict = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise QuantConfigError(
                f"quantization_config.version: this mxserve reads version {CONFIG_VERSION}, checkpoint has {self.version}")

    def scheme_for(self, module: str) -> WeightScheme:
        """Scheme of a dense linear (HF name), falling back to ``default_scheme``."""
        return self.modules.get(module, self.default_scheme)

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "version": self.version,
            "default_scheme": self.default_scheme.name,
            "modules": {k: v.name for k, v in sorted(self.modules.items())},
            "experts": {k: {"gate_up": [s.name for s in p.gate_up], "down": [s.name for s in p.down]}
                        for k, p in sorted(self.experts.items())},
            "kv": self.kv,
            "offload": self.offload,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MxMoEConfig":
        if not isinstance(d, dict):
            raise QuantConfigError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = str(d.get("quant_method", "")).lower()
        if method != QUANT_METHOD:
            raise QuantConfigError(f"quantization_config.quant_method: expected 'mxmoe', got {d.get('quant_method')!r}")
        known = {"quant_method", "version", "default_scheme", "modules", "experts", "kv", "offload", "meta"}
        extra = sorted(set(d) - known)
        if extra:
            raise QuantConfigError(f"quantization_config: unknown field(s) {extra}")
        if "version" not in d:
            raise QuantConfigError("quantization_config.version: missing")
        modules = {str(k): _scheme(v, f"modules[{k!r}]") for k, v in (d.get("modules") or {}).items()}
        experts = {}
        for k, v in (d.get("experts") or {}).items():
            if not isinstance(v, dict) or set(v) != {"gate_up", "down"}:
                raise QuantConfigError(f"quantization_config.experts[{k!r}]: expected {{'gate_up': [...], 'down': [...]}}")
            experts[str(k)] = ExpertPlan(
                gate_up=tuple(_scheme(s, f"experts[{k!r}].gate_up[{i}]") for i, s in enumerate(v["gate_up"])),
                down=tuple(_scheme(s, f"experts[{k!r}].down[{i}]") for i, s in enumerate(v["down"])))
        return cls(default_scheme=_scheme(d.get("default_scheme", "bf16"), "default_scheme"), modules=modules,
                   experts=experts, kv=d.get("kv"), offload=d.get("offload"), meta=dict(d.get("meta") or {}),
                   version=int(d["version"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)
