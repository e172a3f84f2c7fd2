"""Transfer-engine bookkeeping on a CPU device (synchronous copies): after ``execute(plan)`` + ``Residency.apply``
the slot pool holds, for every resident plane, exactly that plane's arena bytes at the slot the residency records;
a "not resident" slot (-1) or a slot past the pool can never be read or written (``buf[-1]`` would silently be the
last slot, another expert's planes: the H200 failure of ``test_evicting_plan_waits_for_compute_and_wait_orders_reads``
read ``st.base_slot`` of a residency the plan had not been applied to)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mxserve.scheduler.cache import Residency
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.layout import BASE, LEVELS, PlaneLayout
from mxserve.scheduler.policy import PlanOp, Policy, PrefetchPlan
from mxserve.scheduler.simulator import num_slots
from mxserve.scheduler.traces import synth_trace
from mxserve.scheduler.transfer import HostArena, SlotPool, TransferEngine
from mxserve_kernels.formats import WeightScheme
from tests.tolerances import BIT_EXACT

L, E = 2, 16
LAYOUT = PlaneLayout(hidden=256, inter=128, gate_up=WeightScheme(bits=4, group_size=64, nested=True),
                     down=WeightScheme(bits=4, group_size=64, nested=True))


def _engine(num_layers: int, slots: int, seed: int = 0) -> TransferEngine:
    arena = HostArena(LAYOUT, num_layers, E, pin=False)
    arena.buf.copy_(torch.randint(0, 256, arena.buf.shape, generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.uint8))
    return TransferEngine(arena, SlotPool(LAYOUT, slots, "cpu"))


def assert_pool_matches(eng: TransferEngine, st: Residency) -> int:
    """Every resident plane's slot bytes == its arena blob; returns the number of planes checked."""
    n = 0
    for l, e in zip(*np.nonzero(st.level)):
        for lv in LEVELS:
            if lv <= st.level[l, e]:
                slot = st.base_slot[l, e] if lv == BASE else st.upper_slot[l, e]
                torch.testing.assert_close(eng.pool.blob(slot, lv), eng.arena.blob(int(l), int(e), lv), **BIT_EXACT)
                n += 1
    return n


def _evict_refill():
    """The GPU test's scenario: layer 1 fills all E slots with bases; layer 0's 8 experts must evict them."""
    st = Residency(L, E, E)
    pol = Policy(OffloadConfig(on_miss="wait", lookahead=0), LAYOUT.plane_bytes, np.full((L, E), 4, np.int8))
    c1 = np.ones(E, np.int64)
    st.observe(1, c1, 0)
    p1 = pol.plan(st, 1, c1)
    st.apply(p1)
    counts = np.zeros(E, np.int64)
    counts[: E // 2] = 1
    st.observe(0, counts, 1)
    return st, p1, pol.plan(st, 0, counts)


def test_evict_refill_reads_through_the_applied_residency():
    st, p1, plan = _evict_refill()
    eng = _engine(L, E)
    eng.execute(p1)
    eng.execute(plan)
    assert any(op.kind == "evict" for op in plan.ops)
    e0 = int(np.nonzero(plan.run_level)[0][0])
    assert st.base_slot[0, e0] == -1                      # plan() never mutates the state it reads
    with pytest.raises(IndexError, match=r"slot -1 outside \[0, 16\)"):
        eng.pool.blob(st.base_slot[0, e0], BASE)          # the old silent wrap to the last slot
    st.apply(plan)
    st.check()
    slot = int(st.base_slot[0, e0])
    assert [op.slot for op in plan.loads if (op.layer, op.expert, op.level) == (0, e0, BASE)] == [slot]
    torch.testing.assert_close(eng.pool.blob(slot, BASE), eng.arena.blob(0, e0, BASE), **BIT_EXACT)
    assert assert_pool_matches(eng, st) == int(st.level[0].astype(bool).sum()) + 2 * int((st.level[0] > BASE).sum())


def test_pool_and_engine_reject_slots_outside_the_pool():
    eng = _engine(1, 4)
    for bad in (-1, 4):
        with pytest.raises(IndexError, match=f"slot {bad} outside"):
            eng.pool.blob(bad, BASE)
    plan = PrefetchPlan(0, (PlanOp("load", 0, 3, BASE, -1, LAYOUT.plane_bytes[BASE]),), np.zeros(E, np.int8), 0, 0, 0)
    with pytest.raises(IndexError, match=r"load of \(0, 3\) plane 2 into slot -1"):
        eng.execute(plan)
    assert eng.bytes_issued == 0                          # validated before any copy


@pytest.mark.parametrize("policy, frac, on_miss", [("hebf", 0.3, "base"), ("lru", 0.25, "wait")])
def test_pool_bytes_follow_residency_over_a_trace(policy, frac, on_miss):
    layers, k, t = 4, 4, 6
    cfg = OffloadConfig(gpu_budget_fraction=frac, policy=policy, on_miss=on_miss, lookahead=1)
    slots = num_slots(cfg, LAYOUT, layers, E)
    st = Residency(layers, E, slots)
    pol = Policy(cfg, LAYOUT.plane_bytes, np.full((layers, E), 4, np.int8))
    eng = _engine(layers, slots, seed=5)
    tr = synth_trace(6, layers, E, k, t, seed=9)
    evictions = 0
    for s in range(tr.num_steps):
        for l in range(layers):
            counts = np.bincount(tr.topk[s, l].ravel(), minlength=E)
            st.observe(l, counts, s * layers + l)
            look = {l + 1: np.bincount(tr.pred[s, l + 1].ravel(), minlength=E)} if l + 1 < layers else None
            plan = pol.plan(st, l, counts, look, window_us=5.0)
            st.apply(plan)
            eng.execute(plan)
            evictions += sum(op.kind == "evict" for op in plan.ops)
            st.check()
            assert (st.level[l][counts > 0] >= BASE).all()
            assert assert_pool_matches(eng, st) > 0
    assert evictions > 0, "budget too large: the test must exercise slot reuse"
