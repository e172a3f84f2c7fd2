"""The ``quantization_config["kv"]`` dict: validated, versioned KV-cache quantization settings (schema version 1).

JSON shape::

    {"version": 1, "format": "mxkv-slot-v1",
     "sink_tokens": 4, "window_tokens": 128,          # full-precision zones (runtime may override)
     "layers": [ {"k_bits": 2, "v_bits": 1.5, "k_group": 64, "v_group": 128,
                  "k_clip": 0.94, "v_clip": 1.0,
                  "k_perm": [[...D ints...] per kv head] | null, "v_perm": ... | null}, ... ],   # one per layer
     "meta": {"method": "...", "budget_bits": 2.2, "avg_bits": ..., ...}}

``v_bits`` 1.5 means ternary stored at 1.6 bit (5 trits per byte). Layer i is the i-th decoder layer's attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mxserve_kernels.attention.kv_format import SUPPORTED_BITS, KVSlotFormat

KV_CONFIG_VERSION = 1
KV_FORMAT = "mxkv-slot-v1"


class KVConfigError(ValueError):
    """A malformed ``quantization_config.kv``; the message names the offending field."""


def _num(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise KVConfigError(f"quantization_config.kv.{where}: expected a number, got {x!r}")
    return x


@dataclass(frozen=True)
class KVLayerConfig:
    """One layer's KV quantization: bits, groups, clip ratios and within-head channel orders ([H][D] or None)."""

    k_bits: float
    v_bits: float
    k_group: int
    v_group: int
    k_clip: float = 1.0
    v_clip: float = 1.0
    k_perm: tuple[tuple[int, ...], ...] | None = None
    v_perm: tuple[tuple[int, ...], ...] | None = None

    def validate(self, where: str, head_dim: int | None = None) -> None:
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise KVConfigError(f"quantization_config.kv.{where}.{name}: {getattr(self, name)} not in "
                                    f"{SUPPORTED_BITS}")
        for name in ("k_clip", "v_clip"):
            if not 0.5 <= getattr(self, name) <= 1.0:
                raise KVConfigError(f"quantization_config.kv.{where}.{name}: {getattr(self, name)} not in [0.5, 1]")
        for name in ("k_perm", "v_perm"):
            perm = getattr(self, name)
            if perm is None:
                continue
            for h, row in enumerate(perm):
                if sorted(row) != list(range(len(row))) or (head_dim is not None and len(row) != head_dim):
                    raise KVConfigError(f"quantization_config.kv.{where}.{name}[{h}]: not a permutation of "
                                        f"range({head_dim if head_dim is not None else len(row)})")
        if head_dim is not None:
            try:
                self.slot_format(head_dim)
            except ValueError as e:
                raise KVConfigError(f"quantization_config.kv.{where}: {e}") from None

    def slot_format(self, head_dim: int) -> KVSlotFormat:
        return KVSlotFormat(head_dim, k_bits=self.k_bits, v_bits=self.v_bits, k_group=self.k_group,
                            v_group=self.v_group)

    def to_dict(self) -> dict:
        return {"k_bits": self.k_bits, "v_bits": self.v_bits, "k_group": self.k_group, "v_group": self.v_group,
                "k_clip": self.k_clip, "v_clip": self.v_clip,
                "k_perm": [list(r) for r in self.k_perm] if self.k_perm is not None else None,
                "v_perm": [list(r) for r in self.v_perm] if self.v_perm is not None else None}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "KVLayerConfig":
        if not isinstance(d, dict):
            raise KVConfigError(f"quantization_config.kv.{where}: expected an object, got {type(d).__name__}")
        known = {"k_bits", "v_bits", "k_group", "v_group", "k_clip", "v_clip", "k_perm", "v_perm"}
        extra = sorted(set(d) - known)
        missing = sorted({"k_bits", "v_bits", "k_group", "v_group"} - set(d))
        if extra or missing:
            raise KVConfigError(f"quantization_config.kv.{where}: unknown {extra} / missing {missing}")

        def perm(x, name):
            if x is None:
                return None
            if not isinstance(x, list) or not all(isinstance(r, list) for r in x):
                raise KVConfigError(f"quantization_config.kv.{where}.{name}: expected [[int]*D]*H or null")
            return tuple(tuple(int(i) for i in r) for r in x)
        cfg = cls(k_bits=_num(d["k_bits"], f"{where}.k_bits"), v_bits=_num(d["v_bits"], f"{where}.v_bits"),
                  k_group=int(_num(d["k_group"], f"{where}.k_group")),
                  v_group=int(_num(d["v_group"], f"{where}.v_group")),
                  k_clip=float(_num(d.get("k_clip", 1.0), f"{where}.k_clip")),
                  v_clip=float(_num(d.get("v_clip", 1.0), f"{where}.v_clip")),
                  k_perm=perm(d.get("k_perm"), "k_perm"), v_perm=perm(d.get("v_perm"), "v_perm"))
        cfg.validate(where)
        return cfg


@dataclass(frozen=True)
class KVQuantConfig:
    """Validated ``quantization_config["kv"]`` (picklable, GPU-free)."""

    layers: tuple[KVLayerConfig, ...]
    sink_tokens: int = 4
    window_tokens: int = 128
    meta: dict = field(default_factory=dict)
    version: int = KV_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != KV_CONFIG_VERSION:
            raise KVConfigError(f"quantization_config.kv.version: this mxserve reads {KV_CONFIG_VERSION}, "
                                f"got {self.version}")
        if self.sink_tokens < 0 or self.window_tokens < 0:
            raise KVConfigError(f"quantization_config.kv: sink_tokens={self.sink_tokens}, "
                                f"window_tokens={self.window_tokens} must be >= 0")
        if not self.layers:
            raise KVConfigError("quantization_config.kv.layers: empty")

    def layer(self, i: int) -> KVLayerConfig:
        if not 0 <= i < len(self.layers):
            raise KVConfigError(f"quantization_config.kv.layers: no entry for layer {i} ({len(self.layers)} layers)")
        return self.layers[i]

    def validate_model(self, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        """Check the config against a model geometry (layer count, kv heads, head_dim)."""
        if len(self.layers) != num_layers:
            raise KVConfigError(f"quantization_config.kv.layers: {len(self.layers)} entries, model has {num_layers}")
        for i, lc in enumerate(self.layers):
            lc.validate(f"layers[{i}]", head_dim)
            for name in ("k_perm", "v_perm"):
                p = getattr(lc, name)
                if p is not None and len(p) != num_kv_heads:
                    raise KVConfigError(f"quantization_config.kv.layers[{i}].{name}: {len(p)} heads, model has "
                                        f"{num_kv_heads} kv heads")

    def to_dict(self) -> dict:
        return {"version": self.version, "format": KV_FORMAT, "sink_tokens": self.sink_tokens,
                "window_tokens": self.window_tokens, "layers": [lc.to_dict() for lc in self.layers],
                "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any) -> "KVQuantConfig":
        if not isinstance(d, dict):
            raise KVConfigError(f"quantization_config.kv: expected an object, got {type(d).__name__}")
        extra = sorted(set(d) - {"version", "format", "sink_tokens", "window_tokens", "layers", "meta"})
        if extra:
            raise KVConfigError(f"quantization_config.kv: unknown field(s) {extra}")
        if "version" not in d:
            raise KVConfigError("quantization_config.kv.version: missing")
        if d.get("format", KV_FORMAT) != KV_FORMAT:
            raise KVConfigError(f"quantization_config.kv.format: {d.get('format')!r}, expected {KV_FORMAT!r}")
        layers = d.get("layers")
        if not isinstance(layers, list):
            raise KVConfigError("quantization_config.kv.layers: expected a list (one entry per layer)")
        return cls(layers=tuple(KVLayerConfig.from_dict(x, f"layers[{i}]") for i, x in enumerate(layers)),
                   sink_tokens=int(_num(d.get("sink_tokens", 4), "sink_tokens")),
                   window_tokens=int(_num(d.get("window_tokens", 128), "window_tokens")),
                   meta=dict(d.get("meta") or {}), version=int(_num(d["version"], "version")))

    @classmethod
    def uniform(cls, num_layers: int, k_bits: float, v_bits: float, k_group: int, v_group: int,
                **kw: Any) -> "KVQuantConfig":
        """Same bits/groups in every layer, no clip, no reorder (the uncalibrated baseline)."""
        return cls(layers=tuple(KVLayerConfig(k_bits, v_bits, k_group, v_group) for _ in range(num_layers)), **kw)
