"""Residency bookkeeping of the GPU expert slot pool (pure numpy; no torch, no GPU) and the offload counters.

Every (layer l, expert e) has a *resident prefix* ``level[l, e]`` in {0, 2, 3, 4}: 0 = nothing on the GPU, 2 = its
base plane, 3 = base + plane 3, 4 = base + planes 3, 4. The base lives in one slot (``base_slot``); planes 3 and 4
share one *upper* slot (``upper_slot``). Planes are always resident as a prefix, so an eviction removes the top
slot: the upper slot if ``level >= 3`` (both upper planes at once), else the base slot.

``apply(plan)`` replays a ``policy.PrefetchPlan``'s ordered evictions and loads; the policy plans on a ``copy()``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from mxserve.scheduler.layout import BASE, LEVELS

KIND_BASE, KIND_UPPER = 0, 1


class Residency:
    """Which planes of which experts occupy which of the ``num_slots`` GPU slots.

    Args:
        num_layers: L offloaded MoE layers.
        num_experts: E experts per layer.
        num_slots: S slots in the GPU pool (the budget, in slots).
        hot_decay: per-step decay of the router-count EMA ``hot``.
    """

    def __init__(self, num_layers: int, num_experts: int, num_slots: int, hot_decay: float = 0.9) -> None:
        if num_slots < 0:
            raise ValueError(f"Residency: num_slots must be >= 0, got {num_slots}")
        self.L, self.E, self.S = num_layers, num_experts, num_slots
        self.hot_decay = hot_decay
        self.level = np.zeros((num_layers, num_experts), np.int8)       # [L, E] resident prefix
        self.base_slot = np.full((num_layers, num_experts), -1, np.int32)   # [L, E]
        self.upper_slot = np.full((num_layers, num_experts), -1, np.int32)  # [L, E]
        self.last_use = np.full((num_layers, num_experts), -1, np.int64)   # [L, E] tick of last demand
        self.hot = np.zeros((num_layers, num_experts), np.float64)          # [L, E] router-count EMA
        self._free = list(range(num_slots))                                  # min-heap: lowest slot first
        self.version = 0                                                      # bumps on every mutation

    # ---- queries ---------------------------------------------------------------------------------------------
    @property
    def slots_used(self) -> int:
        return self.S - len(self._free)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def copy(self) -> "Residency":
        r = Residency.__new__(Residency)
        r.L, r.E, r.S, r.hot_decay = self.L, self.E, self.S, self.hot_decay
        for name in ("level", "base_slot", "upper_slot", "last_use", "hot"):
            setattr(r, name, getattr(self, name).copy())
        r._free = list(self._free)
        r.version = self.version
        return r

    def resident_bytes(self, plane_bytes: dict[int, int]) -> int:
        """Bytes of resident planes (<= slots_used * slot_bytes)."""
        return int(sum(int((self.level >= lv).sum()) * plane_bytes[lv] for lv in LEVELS))

    def plane_counts(self) -> dict[int, int]:
        """Number of resident planes per level."""
        return {lv: int((self.level >= lv).sum()) for lv in LEVELS}

    def check(self) -> None:
        """Assert the invariants (prefix residency, slot ownership one-to-one); for tests."""
        used = [int(s) for s in self.base_slot[self.base_slot >= 0]] + [int(s) for s in self.upper_slot[self.upper_slot >= 0]]
        assert len(used) == len(set(used)), "a slot is owned twice"
        assert len(used) + len(self._free) == self.S and not set(used) & set(self._free), "slot leak"
        assert ((self.level >= BASE) == (self.base_slot >= 0)).all(), "base residency mismatch"
        assert ((self.level >= BASE + 1) == (self.upper_slot >= 0)).all(), "upper residency mismatch"

    # ---- mutations -------------------------------------------------------------------------------------------
    def observe(self, layer: int, counts: np.ndarray, tick: int) -> None:
        """Record one layer's router demand: ``counts`` [E] tokens per expert at time ``tick``."""
        self.hot[layer] = self.hot[layer] * self.hot_decay + counts
        self.last_use[layer, counts > 0] = tick

    def take_slot(self) -> int:
        if not self._free:
            raise RuntimeError("Residency: no free GPU expert slot (evict first)")
        return heapq.heappop(self._free)

    def load(self, layer: int, expert: int, level: int, slot: int | None = None) -> int:
        """Make plane ``level`` of (layer, expert) resident; returns its slot. Planes load in prefix order."""
        cur = int(self.level[layer, expert])
        if level != (BASE if cur == 0 else cur + 1) or level not in LEVELS:
            raise ValueError(f"Residency.load: expert ({layer}, {expert}) has prefix {cur}, cannot load plane {level}")
        if level == BASE or level == BASE + 1:
            if slot is None:
                slot = self.take_slot()
            else:
                self._free.remove(slot)
                heapq.heapify(self._free)
            (self.base_slot if level == BASE else self.upper_slot)[layer, expert] = slot
        else:
            slot = int(self.upper_slot[layer, expert])
        self.level[layer, expert] = level
        self.version += 1
        return int(slot)

    def evict_top(self, layer: int, expert: int) -> tuple[int, int]:
        """Free the top slot of (layer, expert); returns (kind, slot)."""
        cur = int(self.level[layer, expert])
        if cur == 0:
            raise ValueError(f"Residency.evict_top: expert ({layer}, {expert}) is not resident")
        if cur > BASE:
            kind, slot = KIND_UPPER, int(self.upper_slot[layer, expert])
            self.upper_slot[layer, expert] = -1
            self.level[layer, expert] = BASE
        else:
            kind, slot = KIND_BASE, int(self.base_slot[layer, expert])
            self.base_slot[layer, expert] = -1
            self.level[layer, expert] = 0
        heapq.heappush(self._free, slot)
        self.version += 1
        return kind, slot

    def apply(self, plan) -> None:
        """Replay a ``PrefetchPlan``'s ops (evictions and loads, in order) on this state."""
        for op in plan.ops:
            if op.kind == "evict":
                kind, slot = self.evict_top(op.layer, op.expert)
                if slot != op.slot:
                    raise RuntimeError(f"Residency.apply: plan evicts slot {op.slot}, state freed {slot} (stale plan)")
            else:
                slot = self.load(op.layer, op.expert, op.level)  # same heap order as the planning copy
                if slot != op.slot:
                    raise RuntimeError(f"Residency.apply: plan loads into slot {op.slot}, state used {slot}")


@dataclass
class OffloadCounters:
    """Cumulative counters published by the ops metrics side channel (``snapshot()`` -> plain dict)."""

    hits: int = 0                 # active experts whose target prefix was resident (or in flight) at demand time
    misses: int = 0               # active experts that needed a demand load
    bytes_moved: int = 0          # host->GPU bytes issued (demand + prefetch)
    prefetch_bytes: int = 0       # of which prefetch
    stall_seconds: float = 0.0    # compute time spent waiting for copies
    degraded: int = 0             # active experts run below their target prefix
    plane_mix: dict[int, int] = field(default_factory=lambda: {lv: 0 for lv in LEVELS})  # tokens per run level
    prefetch_issued: int = 0      # experts that got a plane by look-ahead prefetch / backfill (once per arrival)
    prefetch_useful: int = 0      # of which routed before their base was evicted
    resident_experts: int = 0     # gauge: experts with at least the base resident
    resident_bytes: int = 0       # gauge

    def snapshot(self) -> dict:
        """Plain, JSON-serialisable copy (keys stable: the metrics definitions rely on them)."""
        return {"hits": self.hits, "misses": self.misses, "bytes_moved": self.bytes_moved,
                "prefetch_bytes": self.prefetch_bytes, "stall_seconds": self.stall_seconds,
                "degraded": self.degraded, "plane_mix": {f"int{k}": v for k, v in self.plane_mix.items()},
                "prefetch_issued": self.prefetch_issued, "prefetch_useful": self.prefetch_useful,
                "resident_experts": self.resident_experts, "resident_bytes": self.resident_bytes,
                "hit_rate": self.hits / max(self.hits + self.misses, 1)}

    def metric_values(self, level: np.ndarray, host_pinned_bytes: int) -> dict:
        """The ``sidechannel.publish("offload", ...)`` payload: keys of ``mxserve.metrics.definitions.WORKER_METRICS``.

        Args:
            level: [L, E] resident prefix per expert (``Residency.level``) for the ``resident_*`` gauges.
            host_pinned_bytes: bytes of the pinned host arena.
        Returns:
            {"expert_cache_hits", "expert_cache_misses", "expert_h2d_bytes", "expert_stall_seconds",
            "prefetch_issued", "prefetch_useful" (cumulative), "resident_experts", "resident_planes"
            ({"2"|"3"|"4": experts whose resident prefix is exactly that many bits}), "host_pinned_bytes"}; plain
            Python numbers.
        """
        return {"expert_cache_hits": int(self.hits), "expert_cache_misses": int(self.misses),
                "expert_h2d_bytes": int(self.bytes_moved), "expert_stall_seconds": float(self.stall_seconds),
                "prefetch_issued": int(self.prefetch_issued), "prefetch_useful": int(self.prefetch_useful),
                "resident_experts": int((level >= BASE).sum()),
                "resident_planes": {str(lv): int((level == lv).sum()) for lv in LEVELS},
                "host_pinned_bytes": int(host_pinned_bytes)}
