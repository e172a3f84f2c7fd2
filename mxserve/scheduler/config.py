"""The ``offload`` section of an mxmoe ``quantization_config`` (or ``--hf-overrides``): typed, validated, versioned.

JSON shape (every field optional except ``version``; defaults below)::

    "offload": {"version": 1, "enabled": true,
                "gpu_budget_gib": 8.0 | null,       # absolute GPU slot-pool size, or
                "gpu_budget_fraction": 0.25 | null, # fraction of all offloaded expert bytes (one of the two)
                "policy": "hebf" | "lru" | "none",  # prefetch + eviction policy
                "lookahead": 1,                      # layers predicted ahead with the next router (0 = off)
                "on_miss": "base" | "wait",          # run a late expert at its resident base plane, or stall
                "max_stall_us": 0.0,                 # stall tolerated per layer before degrading (on_miss=base)
                "base_keep_weight": 2.0,             # eviction: a base plane counts this many times an upper plane
                "hot_decay": 0.9,                    # per-step decay of the router-count EMA (hotness)
                "h2d_gbps": 50.0,                    # planning estimate of host->GPU bandwidth (measured by bench)
                "allow_eager_fallback": true}        # if CUDA graphs cannot split the MoE op: eager, logged

Exactly one of ``gpu_budget_gib`` / ``gpu_budget_fraction`` may be set; neither means 100% (all resident).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

OFFLOAD_CONFIG_VERSION = 1
POLICIES = ("hebf", "lru", "none")
ON_MISS = ("base", "wait")
GIB = 1 << 30


class OffloadConfigError(ValueError):
    """A malformed ``quantization_config.offload`` section; the message names the field."""


@dataclass(frozen=True)
class OffloadConfig:
    """Expert-offload settings (frozen, picklable, GPU-free).

    Args:
        enabled: offload experts to the pinned host arena (False: every expert stays on the GPU).
        gpu_budget_gib: GPU slot-pool bytes in GiB (exclusive with ``gpu_budget_fraction``).
        gpu_budget_fraction: pool size as a fraction in (0, 1] of the offloaded expert bytes (all planes).
        policy: "hebf" (hottest-expert-bit-first prefetch, hotness eviction keeping low planes), "lru" (look-ahead
            prefetch expert by expert, least-recently-used eviction) or "none" (on-demand loads, LRU eviction).
        lookahead: number of next layers whose experts are predicted and prefetched (0 disables prefetch).
        on_miss: "base" runs an expert whose upper planes would arrive too late at its resident prefix (at least
            the int2 base) instead of stalling; "wait" always stalls for the configured prefix.
        max_stall_us: per-layer stall tolerated before "base" degrades upper planes.
        base_keep_weight: eviction weight of a base plane relative to an upper plane of equal hotness (>= 1 keeps
            hot experts' low planes resident longer).
        hot_decay: decay in [0, 1) of the per-expert router-count EMA, applied once per step.
        h2d_gbps: host-to-device bandwidth estimate (GB/s) used to plan degradation deadlines.
        allow_eager_fallback: if the MoE op cannot be made a CUDA-graph splitting op, run eager (logged) rather
            than refusing to start.
        version: schema version written to the checkpoint.
    """

    enabled: bool = True
    gpu_budget_gib: float | None = None
    gpu_budget_fraction: float | None = None
    policy: str = "hebf"
    lookahead: int = 1
    on_miss: str = "base"
    max_stall_us: float = 0.0
    base_keep_weight: float = 2.0
    hot_decay: float = 0.9
    h2d_gbps: float = 50.0
    allow_eager_fallback: bool = True
    version: int = OFFLOAD_CONFIG_VERSION

    def __post_init__(self) -> None:
        def bad(field: str, msg: str) -> OffloadConfigError:
            return OffloadConfigError(f"quantization_config.offload.{field}: {msg}")

        if self.version != OFFLOAD_CONFIG_VERSION:
            raise bad("version", f"this mxserve reads version {OFFLOAD_CONFIG_VERSION}, got {self.version!r}")
        if self.gpu_budget_gib is not None and self.gpu_budget_fraction is not None:
            raise bad("gpu_budget_gib", "set gpu_budget_gib or gpu_budget_fraction, not both")
        if self.gpu_budget_gib is not None and not (isinstance(self.gpu_budget_gib, (int, float))
                                                    and self.gpu_budget_gib > 0):
            raise bad("gpu_budget_gib", f"expected a positive number of GiB, got {self.gpu_budget_gib!r}")
        if self.gpu_budget_fraction is not None and not (isinstance(self.gpu_budget_fraction, (int, float))
                                                         and 0 < self.gpu_budget_fraction <= 1):
            raise bad("gpu_budget_fraction", f"expected a fraction in (0, 1], got {self.gpu_budget_fraction!r}")
        if self.policy not in POLICIES:
            raise bad("policy", f"expected one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.lookahead, int) or isinstance(self.lookahead, bool) or not 0 <= self.lookahead <= 8:
            raise bad("lookahead", f"expected an integer in [0, 8], got {self.lookahead!r}")
        if self.on_miss not in ON_MISS:
            raise bad("on_miss", f"expected one of {ON_MISS}, got {self.on_miss!r}")
        if not self.max_stall_us >= 0:
            raise bad("max_stall_us", f"expected >= 0, got {self.max_stall_us!r}")
        if not self.base_keep_weight >= 1:
            raise bad("base_keep_weight", f"expected >= 1, got {self.base_keep_weight!r}")
        if not 0 <= self.hot_decay < 1:
            raise bad("hot_decay", f"expected a value in [0, 1), got {self.hot_decay!r}")
        if not self.h2d_gbps > 0:
            raise bad("h2d_gbps", f"expected > 0, got {self.h2d_gbps!r}")

    def budget_bytes(self, total_expert_bytes: int) -> int:
        """GPU slot-pool bytes for ``total_expert_bytes`` of offloadable experts (all planes, all layers)."""
        if not self.enabled:
            return int(total_expert_bytes)
        if self.gpu_budget_gib is not None:
            return min(int(self.gpu_budget_gib * GIB), int(total_expert_bytes))
        frac = 1.0 if self.gpu_budget_fraction is None else float(self.gpu_budget_fraction)
        return int(total_expert_bytes * frac)

    @property
    def prefetch(self) -> bool:
        return self.policy != "none" and self.lookahead > 0

    # ---- (de)serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> "OffloadConfig":
        """Parse ``quantization_config["offload"]`` (None -> disabled). Unknown fields are an error."""
        if d is None:
            return cls(enabled=False)
        if not isinstance(d, dict):
            raise OffloadConfigError(f"quantization_config.offload: expected an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise OffloadConfigError(f"quantization_config.offload: unknown field(s) {extra}")
        if "version" not in d:
            raise OffloadConfigError("quantization_config.offload.version: missing")
        return cls(**d)
