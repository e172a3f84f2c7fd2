"""Pure offload policy: router stats + look-ahead -> ``PrefetchPlan`` (no torch, no GPU, deterministic).

Per MoE layer ``l`` and step, ``Policy.plan`` reads the current residency (``cache.Residency``, not modified), the
layer's router counts ``[E]`` and predicted counts ``[E]`` for the next ``lookahead`` layers, and returns an ordered
list of evictions and plane loads plus the prefix each active expert computes at.

Policies (``OffloadConfig.policy``):
  * ``hebf`` (D2MoE "hottest-expert-bit-first"): missing planes load plane-major, lowest plane first and, within a
    plane, most-requested expert first; next-layer look-ahead prefetch in the same order; eviction removes the
    top slot with the lowest ``hot * w`` (``w = base_keep_weight`` for a base plane, 1 for the upper planes), ties
    to the layer used furthest in the future, so hot experts' low planes stay resident (D2MoE Alg. 2).
  * ``lru``: look-ahead prefetch and demand loads expert by expert (all planes of one expert, then the next);
    least-recently-used eviction.
  * ``none``: demand loads only, expert by expert; LRU eviction.

Degradation (``on_miss="base"``): demand loads are costed at ``h2d_gbps`` from the copy engine's backlog; an upper
plane that would complete after ``window_us + max_stall_us`` (``window_us``: compute that overlaps the copies) is
dropped and its expert runs at the prefix it has, at least the base, which always loads.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from mxserve.scheduler.cache import Residency
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.layout import BASE, LEVELS


@dataclass(frozen=True)
class PlanOp:
    """One ordered step of a plan: ``evict`` the top slot of (layer, expert), or ``load`` plane ``level``."""

    kind: str          # "evict" | "load"
    layer: int
    expert: int
    level: int         # load: plane level; evict: level freed from (BASE frees the base, else the upper slot)
    slot: int
    nbytes: int = 0    # bytes copied (loads)
    demand: bool = True  # load for the current layer (False: look-ahead prefetch)


@dataclass(frozen=True)
class PrefetchPlan:
    """What to do for one layer at one step.

    Attributes:
        layer: the MoE layer being computed.
        ops: evictions and loads in issue order (loads are copied in this order on the side stream).
        run_level: [E] int8 prefix each expert computes at (0: not routed).
        hits / misses: routed experts whose target prefix was / was not resident (or in flight) before the plan.
        degraded: routed experts run below their target prefix.
    """

    layer: int
    ops: tuple[PlanOp, ...]
    run_level: np.ndarray
    hits: int
    misses: int
    degraded: int

    @property
    def loads(self) -> tuple[PlanOp, ...]:
        return tuple(op for op in self.ops if op.kind == "load")

    @property
    def demand_bytes(self) -> int:
        return sum(op.nbytes for op in self.loads if op.demand)

    @property
    def prefetch_bytes(self) -> int:
        return sum(op.nbytes for op in self.loads if not op.demand)


class _Victims:
    """Eviction candidates (top slots of unpinned resident experts) in policy order, built lazily once per plan.

    The candidates are numpy arrays; only a prefix of the policy order is sorted, and only the entries a pop
    inspects become Python ints: a plan pops a handful of victims out of thousands of resident slots (48 layers x
    128 experts at a 25% budget: ~3000), and sorting / converting them all cost ~2 ms per plan. The prefix holds
    every candidate whose primary key is <= the ``PREFIX``-th smallest, so it is exactly the head of the full order
    (the full key is unique: it ends with the flat index); it doubles when a plan pops past it.
    """

    PREFIX = 256

    def __init__(self, s: Residency, layer: int, kind: str, base_w: float, pinned: np.ndarray) -> None:
        self.s, self.layer, self.kind, self.base_w, self.pinned = s, layer, kind, base_w, pinned
        self.order: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # (l, e, level) in policy order
        self.ptr = 0
        self.heap: list = []
        self._best: tuple | None = None          # remembered (key, l, e) of the best valid candidate

    def key(self, l: int, e: int) -> tuple:
        dist = (l - self.layer - 1) % self.s.L          # layers until next use: l+1 -> 0, this layer -> L-1
        if self.kind == "hebf":
            w = self.base_w if self.s.level[l, e] == BASE else 1.0
            return (float(self.s.hot[l, e]) * w, -dist, l * self.s.E + e)
        return (int(self.s.last_use[l, e]), -dist, l * self.s.E + e)

    def _build(self) -> None:
        """Snapshot the candidates' keys (state as of the first pop) and sort the first ``PREFIX`` of them."""
        s = self.s
        flat = np.flatnonzero((s.level > 0) & ~self.pinned)
        ls, es = np.divmod(flat, s.E)
        lv = s.level.ravel()[flat]
        if self.kind == "hebf":
            prim = s.hot.ravel()[flat] * np.where(lv == BASE, self.base_w, 1.0)
        else:
            prim = s.last_use.ravel()[flat].astype(np.float64)
        self._cand = (ls, es, lv, prim, -((ls - self.layer - 1) % s.L), flat)
        self._sort(self.PREFIX)

    def _sort(self, m: int) -> None:
        """``order`` = the candidates whose primary key is <= the m-th smallest, in full policy order."""
        ls, es, lv, prim, ndist, flat = self._cand
        if m < len(prim):
            sel = np.nonzero(prim <= np.partition(prim, m - 1)[m - 1])[0]
        else:
            sel = np.arange(len(prim))
        idx = sel[np.lexsort((flat[sel], ndist[sel], prim[sel]))]
        self.order = (ls[idx], es[idx], lv[idx])
        self._m, self._complete = m, len(sel) == len(prim)

    def _head(self):
        """Advance past stale sorted entries; returns (key, l, e) of the best valid sorted entry or None."""
        while True:
            ol, oe, olv = self.order
            if self.ptr >= len(ol):
                if self._complete:
                    return None
                self._sort(2 * self._m)          # the new order starts with the old one: ptr stays valid
                continue
            l, e, lv = int(ol[self.ptr]), int(oe[self.ptr]), int(olv[self.ptr])
            if not self.pinned[l, e] and self.s.level[l, e] == lv:
                return self.key(l, e), l, e
            self.ptr += 1

    def pop(self, limit: tuple | None) -> tuple[int, int] | None:
        """Best victim (l, e) with key < ``limit`` (any if None), or None.

        The best candidate is remembered until it is popped, a base is exposed or ``invalidate()``: a background
        load whose limit it fails (most of them at a small budget) then costs one tuple comparison.
        """
        if self.order is None:
            self._build()
        if self._best is None:
            while self.heap and (self.pinned[self.heap[0][1], self.heap[0][2]]
                                 or self.s.level[self.heap[0][1], self.heap[0][2]] != BASE):
                heapq.heappop(self.heap)
            cands = [c for c in (self._head(), self.heap[0] if self.heap else None) if c is not None]
            if not cands:
                return None
            self._best = min(cands)
        key, l, e = self._best
        if limit is not None and not key < limit:
            return None
        if self.heap and self._best == self.heap[0]:
            heapq.heappop(self.heap)
        else:
            self.ptr += 1
        self._best = None
        return l, e

    def invalidate(self) -> None:
        """``pinned`` changed: forget the remembered best candidate."""
        self._best = None

    def exposed_base(self, l: int, e: int) -> None:
        """An upper slot was evicted: (l, e)'s base is now its top slot and a candidate."""
        if self.order is not None:
            heapq.heappush(self.heap, (self.key(l, e), l, e))
            self._best = None


class Policy:
    """Plans loads and evictions for one offloaded model.

    Args:
        cfg: the offload config (policy, look-ahead, on_miss, weights).
        plane_bytes: bytes per plane level {2: base, 3: plane3, 4: plane4} (``layout.PlaneLayout.plane_bytes``).
        target: [L, E] int8 target prefix per expert (the nested scheme's runtime bits, 2..4).
    """

    def __init__(self, cfg: OffloadConfig, plane_bytes: dict[int, int], target: np.ndarray) -> None:
        if target.ndim != 2 or not np.isin(target, LEVELS).all():
            raise ValueError(f"Policy: target must be [L, E] with levels in {LEVELS}")
        self.cfg, self.plane_bytes, self.target = cfg, dict(plane_bytes), target.astype(np.int8)
        self.bytes_per_us = cfg.h2d_gbps * 1e3   # GB/s -> bytes/us

    def _order(self, layer: int, counts: np.ndarray, cur_level: np.ndarray) -> list[tuple[int, int]]:
        """Missing (plane, expert) units of a layer in the policy's load order."""
        tgt = self.target[layer]
        units = [(p, int(e)) for e in np.nonzero(counts > 0)[0] for p in LEVELS if cur_level[e] < p <= tgt[e]]
        if self.cfg.policy == "hebf":
            units.sort(key=lambda u: (u[0], -counts[u[1]], u[1]))   # lowest plane, then hottest expert
        else:
            units.sort(key=lambda u: (u[1], u[0]))                   # request (expert) order, whole expert
        return units

    def plan(self, state: Residency, layer: int, counts: np.ndarray, lookahead: dict[int, np.ndarray] | None = None,
             window_us: float = math.inf, backlog_us: float = 0.0, demand: bool = True) -> PrefetchPlan:
        """Plan layer ``layer``'s demand loads and the look-ahead prefetch (``state`` is not modified).

        Args:
            state: residency after ``state.observe(layer, counts, tick)``.
            layer: MoE layer about to compute.
            counts: [E] tokens routed to each expert.
            lookahead: {layer: [E] predicted counts} for the next layers (only the first ``cfg.lookahead`` used).
            window_us: compute time that overlaps this layer's demand copies before it would stall.
            backlog_us: copy time already queued on the side stream.
            demand: False plans the look-ahead prefetch only (``counts`` then only pins this layer's experts).
        Returns:
            the ``PrefetchPlan``.
        """
        cfg, s = self.cfg, state.copy()
        counts = np.asarray(counts)
        active = counts > 0
        pinned = np.zeros((s.L, s.E), bool)
        pinned[layer, active] = True
        victims = _Victims(s, layer, "hebf" if cfg.policy == "hebf" else "lru", cfg.base_keep_weight, pinned)
        ops: list[PlanOp] = []
        before = s.level[layer].copy()
        tgt = self.target[layer]

        def alloc(l: int, e: int, p: int, limit) -> bool:
            if p != BASE and p != BASE + 1:      # plane 4 shares plane 3's upper slot
                return True
            while s.free_slots == 0:
                v = victims.pop(limit)
                if v is None:
                    return False
                vl, ve = v
                lv = int(s.level[vl, ve])
                _, slot = s.evict_top(vl, ve)
                ops.append(PlanOp("evict", vl, ve, lv if lv == BASE else BASE + 1, slot))
                if lv > BASE:
                    victims.exposed_base(vl, ve)
            return True

        def load(l: int, e: int, p: int, demand: bool) -> None:
            slot = s.load(l, e, p)
            ops.append(PlanOp("load", l, e, p, slot, self.plane_bytes[p], demand))

        # -- demand: this layer's missing planes ----------------------------------------------------------------
        t, deadline = backlog_us, window_us + cfg.max_stall_us
        capped: dict[int, int] = {}
        for p, e in (self._order(layer, counts, before) if demand else ()):
            if e in capped:
                continue
            dur = self.plane_bytes[p] / self.bytes_per_us
            if p > BASE and cfg.on_miss == "base" and t + dur > deadline:
                capped[e] = p
                continue
            if not alloc(layer, e, p, None):
                if p == BASE:
                    raise RuntimeError(
                        f"offload: the GPU expert budget ({s.S} slots) cannot hold the base planes of the "
                        f"{int(active.sum())} experts routed in layer {layer}; raise gpu_budget_gib/fraction")
                capped[e] = p
                continue
            load(layer, e, p, True)
            t += dur
        run_level = np.where(active, np.minimum(s.level[layer], tgt), 0).astype(np.int8)

        def background(l2: int, wanted: np.ndarray) -> None:
            # never-stalling loads: free slots, or victims the policy ranks below the loaded plane
            skip: set[int] = set()
            for p, e in self._order(l2, wanted, s.level[l2]):
                if e in skip:
                    continue
                if cfg.policy == "hebf":
                    w = cfg.base_keep_weight if p == BASE else 1.0
                    limit = ((float(s.hot[l2, e]) * s.hot_decay + float(wanted[e])) * w, -s.L - 1, -1)
                elif cfg.policy == "lru":
                    limit = (int(s.last_use.max()) + 1, -s.L - 1, -1)
                else:
                    limit = (-math.inf,)                     # "none": free slots only
                if not alloc(l2, e, p, limit):
                    skip.add(e)
                    continue
                load(l2, e, p, False)

        # -- look-ahead prefetch: predicted experts of the next layers -------------------------------------------
        if cfg.prefetch and lookahead:
            for d in range(1, cfg.lookahead + 1):
                l2 = layer + d
                pred = lookahead.get(l2)
                if pred is None or l2 >= s.L:
                    continue
                pred = np.asarray(pred)
                pinned[l2, pred > 0] = True
                victims.invalidate()
                background(l2, pred)
        # -- backfill: upper planes this layer ran without, for its next visit ------------------------------------
        if capped:
            background(layer, np.where(run_level < tgt, counts, 0))
        if not demand:
            return PrefetchPlan(layer=layer, ops=tuple(ops), run_level=run_level, hits=0, misses=0, degraded=0)
        hits = int((active & (before >= tgt)).sum())
        return PrefetchPlan(layer=layer, ops=tuple(ops), run_level=run_level, hits=hits,
                            misses=int(active.sum()) - hits, degraded=int((active & (run_level < tgt)).sum()))
