"""``ExpertCache``: the runtime object the vLLM MoE method calls (policy + residency + transfer engine + counters).

Lifecycle (one cache per model; all offloaded MoE layers share its slot pool):
  1. ``ExpertCache(cfg, layout, L, E, target=...)`` in the first layer's ``process_weights_after_loading``: allocates
     the pinned host arena and the GPU slot pool *before* vLLM profiles memory, so the KV cache is sized around it.
  2. ``write_expert(l, e, tensors)`` per expert while loading (canonical nested tensors -> arena), then ``preload()``
     fills the pool (all planes if the budget allows, else base planes, layer by layer).
  3. Per step and layer inside the MoE op (which must run outside CUDA-graph capture: vLLM splitting op, or eager):
     ``view = cache.ensure(l, topk_ids, next_ids=predicted_ids)`` (``predicted_ids``: the next layer's router
     applied to the current hidden states; both histograms in one host sync; ``prefetch(l + 1, ids)`` is the
     two-sync equivalent); compute with ``view.tables`` / ``view.pool``.
  4. ``snapshot()`` -> the ``sidechannel.publish("offload", ...)`` payload (keys of
     ``mxserve.metrics.definitions.WORKER_METRICS``: hits, misses, H2D bytes, stall seconds, prefetches issued /
     useful, resident experts, resident planes by bits, pinned host bytes); ``ensure`` of the last layer publishes
     it at most every ``publish_interval_s``. ``stats()``: the bench/test view (plane mix in tokens, degraded, ...).

``ensure`` makes one host sync (the router's expert histogram), plans with ``policy.Policy``, issues copies on the
side stream and makes the compute stream wait only for the planes this layer computes with.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from mxserve.scheduler.cache import OffloadCounters, Residency
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.layout import BASE, LEVELS, PlaneLayout
from mxserve.scheduler.policy import PlanOp, Policy, PrefetchPlan
from mxserve.scheduler.simulator import TimeModel, num_slots
from mxserve.scheduler.transfer import HostArena, SlotPool, TransferEngine


@dataclass
class SlotView:
    """Where layer ``layer``'s routed experts are, for the GroupGEMM (valid until the next ``ensure(layer)``).

    Attributes:
        tables: [3, E] int32 on the device: row 0 base slot, row 1 upper slot (-1: none), row 2 run level
            (prefix bits to compute expert e with; 0: not routed).
        pool: [S, slot_bytes] uint8 slot pool; offsets of each tensor in a slot: ``layout.specs`` /
            ``layout.slot_offset``.
        run_level: [E] host copy of ``tables[2]``.
    """

    layer: int
    tables: torch.Tensor
    pool: SlotPool
    run_level: np.ndarray
    base_slot: np.ndarray
    upper_slot: np.ndarray

    def expert_tensors(self, expert: int) -> dict[str, torch.Tensor]:
        """Canonical tensors (copies) of planes 2..run_level of a routed expert, for reference paths and tests."""
        lv = int(self.run_level[expert])
        if lv < BASE:
            raise ValueError(f"SlotView: expert {expert} is not routed in layer {self.layer}")
        return self.pool.expert_tensors(int(self.base_slot[expert]), int(self.upper_slot[expert]), lv)


class ExpertCache:
    """GPU expert cache over nested planes.

    Args:
        cfg: offload config.
        layout: plane layout (uniform over layers/experts).
        num_layers / num_experts: L offloaded MoE layers, E experts each.
        target: [L, E] target prefix per expert (default 4 = all planes).
        device: GPU (a CPU device runs the same bookkeeping with synchronous copies, for tests).
        time_model: compute estimates used for the degradation deadline (default from ``cfg.h2d_gbps``).
        measure_stall: time the compute stream's waits with CUDA events (resolved in ``snapshot``).
        arena: an existing host arena to share (benchmarks); default: a new pinned one.
        publish_interval_s: publish ``snapshot()`` to the metrics side channel after the last layer's ``ensure`` at
            most this often (None: never; the side channel itself writes only when ``MXSERVE_METRICS_DIR`` is set).
    """

    def __init__(self, cfg: OffloadConfig, layout: PlaneLayout, num_layers: int, num_experts: int, *,
                 target: np.ndarray | None = None, device: torch.device | str = "cuda",
                 time_model: TimeModel | None = None, measure_stall: bool = True,
                 arena: HostArena | None = None, publish_interval_s: float | None = 1.0) -> None:
        self.cfg, self.layout, self.L, self.E = cfg, layout, num_layers, num_experts
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.target = np.full((num_layers, num_experts), LEVELS[-1], np.int8) if target is None else target
        self.S = num_slots(cfg, layout, num_layers, num_experts)
        if arena is not None and (arena.layout != layout or (arena.L, arena.E) != (num_layers, num_experts)):
            raise ValueError("ExpertCache: the shared arena was built for another layout / geometry")
        self.arena = arena or HostArena(layout, num_layers, num_experts, pin=cuda)
        self.pool = SlotPool(layout, self.S, self.device)
        self.engine = TransferEngine(self.arena, self.pool)
        self.state = Residency(num_layers, num_experts, self.S, cfg.hot_decay)
        self.policy = Policy(cfg, layout.plane_bytes, self.target)
        self.tm = time_model or TimeModel(h2d_gbps=cfg.h2d_gbps)
        self._expert_us = np.zeros(max(LEVELS) + 1)                   # [level] TimeModel.expert_us as an array
        for lv, us in self.tm.expert_us.items():
            self._expert_us[lv] = us
        self.counters = OffloadCounters()
        self._tables_host = torch.zeros((num_layers, 3, num_experts), dtype=torch.int32, pin_memory=cuda)
        self._tables_dev = torch.full((num_layers, 3, num_experts), -1, dtype=torch.int32, device=self.device)
        self._tick = 0
        self._current: tuple[int, np.ndarray] | None = None    # (layer, counts) being computed
        self._copy_end_us = 0.0
        self._measure = measure_stall and cuda
        self._stall_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._prefetched = np.zeros((num_layers, num_experts), bool)   # [L, E] arrived by prefetch, not yet routed
        self.publish_interval_s = publish_interval_s
        self._last_publish = -float("inf")

    # ---- loading ---------------------------------------------------------------------------------------------
    def write_expert(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store one expert's canonical nested tensors in the host arena (see ``HostArena.write_expert``)."""
        self.arena.write_expert(layer, expert, tensors)

    def preload(self) -> int:
        """Fill the pool: every expert at its target prefix if it fits, else base planes layer by layer.

        Returns:
            slots used.
        """
        ops = []
        full = self.S >= 2 * self.L * self.E
        for lv in LEVELS if full else (BASE,):
            for l in range(self.L):
                for e in range(self.E):
                    if self.target[l, e] < lv or self.state.level[l, e] >= lv:
                        continue
                    if lv <= BASE + 1 and self.state.free_slots == 0:
                        break
                    slot = self.state.load(l, e, lv)
                    ops.append(PlanOp("load", l, e, lv, slot, self.layout.plane_bytes[lv], False))
        self.engine.execute(PrefetchPlan(-1, tuple(ops), np.zeros(self.E, np.int8), 0, 0, 0))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_stream(self.engine.stream)
        return self.state.slots_used

    # ---- per step --------------------------------------------------------------------------------------------
    def _hist(self, ids: torch.Tensor) -> torch.Tensor:
        """[E] int64 tokens per expert of ``ids`` (any shape; -1 = not on this rank under EP), without a host sync:
        boolean-mask indexing (``ids[ids >= 0]``) and CUDA ``bincount`` (which reads ``max()`` back) each block
        on the GPU; a scatter-add into a fixed [E + 1] histogram (bin 0: the -1 entries) does not."""
        ids = ids.reshape(-1).to(torch.int64)
        ids = torch.where((ids >= 0) & (ids < self.E), ids + 1, 0)
        hist = torch.zeros(self.E + 1, dtype=torch.int64, device=ids.device)
        return hist.scatter_add_(0, ids, torch.ones_like(ids))[1:]

    def _counts(self, ids: torch.Tensor) -> np.ndarray:
        return self._hist(ids).cpu().numpy()         # the one host sync per layer

    def _issue(self, plan: PrefetchPlan) -> None:
        self.state.apply(plan)
        c = self.counters
        for op in plan.ops:
            if op.kind == "evict" and op.level == BASE:
                self._prefetched[op.layer, op.expert] = False      # evicted before use: not useful
            elif op.kind == "load" and not op.demand and not self._prefetched[op.layer, op.expert]:
                self._prefetched[op.layer, op.expert] = True
                c.prefetch_issued += 1
        self.engine.execute(plan)
        now = time.perf_counter() * 1e6
        nbytes = sum(op.nbytes for op in plan.loads)
        self._copy_end_us = max(self._copy_end_us, now) + nbytes / (self.cfg.h2d_gbps * 1e3)
        self.counters.bytes_moved += nbytes
        self.counters.prefetch_bytes += plan.prefetch_bytes

    def ensure(self, layer: int, topk_ids: torch.Tensor, next_ids: torch.Tensor | None = None) -> SlotView:
        """Make layer ``layer``'s routed experts resident (at least their base) and return where they are.

        Args:
            layer: MoE layer index in [0, L).
            topk_ids: [T, K] int expert ids from the router (device tensor; -1 entries ignored).
            next_ids: optional [T, K] look-ahead prediction for layer ``layer + 1``: same as calling
                ``prefetch(layer + 1, next_ids)`` right after, but both histograms come back in ONE host sync.
        Returns:
            ``SlotView``; the current stream already waits for every plane it names (not for the prefetch).
        """
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("ExpertCache.ensure cannot run inside CUDA-graph capture: make the MoE op a vLLM "
                               "splitting op (PIECEWISE) or run eager (offload.allow_eager_fallback)")
        if not 0 <= layer < self.L:
            raise ValueError(f"ExpertCache.ensure: layer {layer} outside [0, {self.L})")
        pred = None
        if next_ids is not None and self.cfg.prefetch and self.cfg.lookahead >= 1 and layer + 1 < self.L:
            both = torch.stack([self._hist(topk_ids), self._hist(next_ids)]).cpu().numpy()   # one host sync
            counts, pred = both[0], both[1]
        else:
            counts = self._counts(topk_ids)
        self._tick += 1
        self.state.observe(layer, counts, self._tick)
        tgt = self.target[layer]
        resident = (counts > 0) & (self.state.level[layer] >= tgt)
        # compute of the experts already at their target (TimeModel.expert_time, vectorised over the [E] rows)
        window = float((self._expert_us[tgt[resident]] + self.tm.token_us * counts[resident]).sum())
        backlog = max(self._copy_end_us - time.perf_counter() * 1e6, 0.0)
        plan = self.policy.plan(self.state, layer, counts, None, window_us=window, backlog_us=backlog)
        routed = counts > 0
        self.counters.prefetch_useful += int((self._prefetched[layer] & routed).sum())
        self._prefetched[layer, routed] = False                   # before _issue: backfill counts at the next visit
        self._issue(plan)
        self._current = (layer, counts)
        if pred is not None:
            self._issue(self.policy.plan(self.state, layer, counts, {layer + 1: pred}, demand=False))
        c = self.counters
        c.hits += plan.hits
        c.misses += plan.misses
        c.degraded += plan.degraded
        mix = np.bincount(plan.run_level, weights=counts, minlength=max(LEVELS) + 1)
        for lv in LEVELS:
            c.plane_mix[lv] += int(mix[lv])
        if self._measure:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            self.engine.wait(layer, plan.run_level)
            t1.record()
            self._stall_events.append((t0, t1))
        else:
            self.engine.wait(layer, plan.run_level)
        base, upper = self.state.base_slot[layer].copy(), self.state.upper_slot[layer].copy()
        host = self._tables_host[layer]
        host[0] = torch.from_numpy(base)
        host[1] = torch.from_numpy(upper)
        host[2] = torch.from_numpy(plan.run_level.astype(np.int32))
        # the pinned row is rewritten only at this layer's next ensure, after that ensure's host sync
        self._tables_dev[layer].copy_(host, non_blocking=True)
        if layer == self.L - 1 and self.publish_interval_s is not None:
            now = time.monotonic()
            if now - self._last_publish >= self.publish_interval_s:
                self._last_publish = now
                self.publish_metrics()
        return SlotView(layer, self._tables_dev[layer], self.pool, plan.run_level.copy(), base, upper)

    def prefetch(self, layer: int, predicted_ids: torch.Tensor) -> int:
        """Prefetch the experts a look-ahead router predicts for ``layer`` (1..lookahead after the current one).

        Args:
            layer: future MoE layer.
            predicted_ids: [T, K] predicted expert ids.
        Returns:
            bytes issued.
        """
        if self._current is None or not self.cfg.prefetch:
            return 0
        cur, counts = self._current
        if not 1 <= layer - cur <= self.cfg.lookahead or layer >= self.L:
            return 0
        plan = self.policy.plan(self.state, cur, counts, {layer: self._counts(predicted_ids)}, demand=False)
        self._issue(plan)
        return sum(op.nbytes for op in plan.loads)

    # ---- metrics ---------------------------------------------------------------------------------------------
    def _resolve_stalls(self) -> None:
        """Fold the stall-event pairs whose end already executed into ``stall_seconds`` (never blocks)."""
        done = [p for p in self._stall_events if p[1].query()]
        self._stall_events = [p for p in self._stall_events if not p[1].query()]
        self.counters.stall_seconds += sum(a.elapsed_time(b) for a, b in done) * 1e-3
        self.counters.resident_experts = int((self.state.level >= BASE).sum())
        self.counters.resident_bytes = self.state.resident_bytes(self.layout.plane_bytes)

    def snapshot(self) -> dict:
        """The metrics payload: ``sidechannel.publish("offload", cache.snapshot())`` (``OffloadCounters.metric_values``
        keys, i.e. ``WORKER_METRICS`` keys; cumulative counters, current gauges)."""
        self._resolve_stalls()
        return self.counters.metric_values(self.state.level, self.arena.pinned_bytes)

    def publish_metrics(self) -> None:
        """Publish ``snapshot()`` under the side-channel section ``"offload"`` (rate-limited by the side channel)."""
        from mxserve.metrics import (
            sidechannel,  # lazy: prometheus_client only where metrics are used
        )
        sidechannel.publish("offload", self.snapshot())

    def stats(self) -> dict:
        """Bench/test view: ``OffloadCounters.snapshot`` keys (hits, misses, bytes_moved, stall_seconds, degraded,
        plane_mix in routed tokens per run level, ...) plus budget gauges."""
        self._resolve_stalls()
        return {**self.counters.snapshot(), "slots": self.S, "slot_bytes": self.layout.slot_bytes,
                "budget_bytes": self.S * self.layout.slot_bytes, "policy": self.cfg.policy}
