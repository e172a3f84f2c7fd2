"""Trace-replay simulator: runs a ``Policy`` over a ``RouterTrace`` against a time model (pure, reproducible).

Timeline per step and layer: the layer's dense part (attention, router) takes ``dense_us``; then its router counts
are observed, ``window_us`` (compute of the experts already resident at their target prefix) and the copy backlog
are handed to the policy; the plan's loads queue on one copy engine at ``h2d_gbps``; experts compute one after
another in order of readiness, each waiting (stalling) for its planes. Prefetches for layer l+1 issued at layer l
overlap layer l's expert compute and layer l+1's dense part.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mxserve.scheduler.cache import OffloadCounters, Residency
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.layout import BASE, LEVELS, PlaneLayout
from mxserve.scheduler.policy import Policy
from mxserve.scheduler.traces import RouterTrace


@dataclass(frozen=True)
class TimeModel:
    """Per-layer compute times (microseconds) and copy bandwidth.

    Args:
        h2d_gbps: host->GPU copy bandwidth, GB/s.
        dense_us: non-expert work per layer (attention, norms, router).
        expert_us: {level: fixed microseconds per routed expert at that prefix} (weight read + launch share).
        token_us: microseconds per routed token per expert.
    """

    h2d_gbps: float = 50.0
    dense_us: float = 60.0
    expert_us: dict = field(default_factory=lambda: {2: 1.0, 3: 1.4, 4: 1.8})
    token_us: float = 0.05

    def expert_time(self, tokens: int, level: int) -> float:
        return self.expert_us[level] + self.token_us * tokens


def num_slots(cfg: OffloadConfig, layout: PlaneLayout, num_layers: int, num_experts: int) -> int:
    """Slots of the GPU pool for a budget: ``budget_bytes // slot_bytes`` (at most two per expert)."""
    total = layout.expert_bytes * num_layers * num_experts
    return min(cfg.budget_bytes(total) // layout.slot_bytes, 2 * num_layers * num_experts)


@dataclass
class SimResult:
    """Replay outcome (counters over measured steps, times in microseconds)."""

    counters: OffloadCounters
    total_us: float
    stall_us: float
    tokens: int
    max_slots_used: int
    max_resident_bytes: int
    budget_bytes: int
    plans: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        c = self.counters.snapshot()
        return {**c, "total_us": self.total_us, "stall_us": self.stall_us,
                "stall_fraction": self.stall_us / max(self.total_us, 1e-9),
                "tok_per_s": self.tokens / max(self.total_us, 1e-9) * 1e6,
                "max_slots_used": self.max_slots_used, "max_resident_bytes": self.max_resident_bytes,
                "budget_bytes": self.budget_bytes}


def simulate(trace: RouterTrace, cfg: OffloadConfig, layout: PlaneLayout, target: np.ndarray | None = None,
             tm: TimeModel | None = None, warmup_steps: int = 0, keep_plans: bool = False) -> SimResult:
    """Replay ``trace`` under ``cfg``.

    Args:
        trace: router trace with L layers and E experts.
        cfg: offload config (budget, policy, look-ahead, on_miss).
        layout: plane byte sizes.
        target: [L, E] target prefix per expert (default: 4 everywhere).
        tm: time model (default ``TimeModel(h2d_gbps=cfg.h2d_gbps)``).
        warmup_steps: leading steps replayed but not counted.
        keep_plans: keep every ``PrefetchPlan`` in the result (tests).
    Returns:
        ``SimResult``.
    """
    L, E = trace.num_layers, trace.num_experts
    tm = tm or TimeModel(h2d_gbps=cfg.h2d_gbps)
    if target is None:
        target = np.full((L, E), LEVELS[-1], np.int8)
    S = num_slots(cfg, layout, L, E)
    state = Residency(L, E, S, cfg.hot_decay)
    policy = Policy(cfg, layout.plane_bytes, target)
    bw = tm.h2d_gbps * 1e3                                  # bytes / us
    ready = np.zeros((L, E, LEVELS[-1] + 1))                # [L, E, level] time a plane finished copying
    c = OffloadCounters()
    comp_t = copy_t = 0.0
    t0 = stall = 0.0
    max_used = max_bytes = 0
    plans = []
    for s in range(trace.num_steps):
        if s == warmup_steps:
            c, stall, t0 = OffloadCounters(), 0.0, comp_t
        for l in range(L):
            comp_t += tm.dense_us
            counts = trace.counts(s, l)
            state.observe(l, counts, s * L + l)
            active = np.nonzero(counts)[0]
            resident = [e for e in active if state.level[l, e] >= target[l, e]]
            window = sum(tm.expert_time(int(counts[e]), int(target[l, e])) for e in resident)
            look = {l + d: trace.predicted_counts(s, l + d) for d in range(1, cfg.lookahead + 1) if l + d < L}
            plan = policy.plan(state, l, counts, look, window_us=window, backlog_us=max(copy_t - comp_t, 0.0))
            state.apply(plan)
            if keep_plans:
                plans.append(plan)
            for op in plan.loads:
                copy_t = max(copy_t, comp_t) + op.nbytes / bw
                ready[op.layer, op.expert, op.level] = copy_t
                c.bytes_moved += op.nbytes
                c.prefetch_bytes += 0 if op.demand else op.nbytes
            # compute routed experts in order of readiness of their run prefix
            rl = plan.run_level
            ready_e = {int(e): max(ready[l, e, lv] for lv in LEVELS if lv <= rl[e]) for e in active}
            for e in sorted(ready_e, key=lambda e: (ready_e[e], e)):
                if ready_e[e] > comp_t:
                    stall += ready_e[e] - comp_t
                    comp_t = ready_e[e]
                comp_t += tm.expert_time(int(counts[e]), int(rl[e]))
                c.plane_mix[int(rl[e])] += int(counts[e])
            c.hits += plan.hits
            c.misses += plan.misses
            c.degraded += plan.degraded
            max_used = max(max_used, state.slots_used)
            max_bytes = max(max_bytes, state.resident_bytes(layout.plane_bytes))
    c.stall_seconds = stall * 1e-6
    c.resident_experts = int((state.level >= BASE).sum())
    c.resident_bytes = state.resident_bytes(layout.plane_bytes)
    tokens = trace.tokens * (trace.num_steps - warmup_steps)
    return SimResult(counters=c, total_us=comp_t - t0, stall_us=stall, tokens=tokens, max_slots_used=max_used,
                     max_resident_bytes=max_bytes, budget_bytes=S * layout.slot_bytes, plans=plans)
