"""GPU tier: the offload transfer engine (pinned arena -> slot pool on a side stream, events, stream ordering) and
ExpertCache serving exact planes on CUDA. Run: ``pytest -m gpu tests/kernels/test_offload_transfer.py``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mxserve.metrics import sidechannel
from mxserve.scheduler.bench import synthetic_expert
from mxserve.scheduler.cache import Residency
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import BASE, PlaneLayout, qwen3_30b_a3b_layout
from mxserve.scheduler.policy import Policy
from mxserve.scheduler.transfer import HostArena, SlotPool, TransferEngine
from mxserve.scheduler.traces import synth_trace
from mxserve_kernels.formats import WeightScheme
from tests.tolerances import BIT_EXACT

L, E, K, T = 4, 16, 4, 8
SCHEME = WeightScheme(bits=4, group_size=128, nested=True)
SCHEME_LAYOUT = PlaneLayout(hidden=512, inter=256, gate_up=SCHEME, down=SCHEME)
SLEEP_CYCLES = 200_000_000       # ~0.1 s of GPU spin on the compute stream


@pytest.fixture(scope="module")
def experts():
    return {(l, e): synthetic_expert(SCHEME_LAYOUT, seed=l * E + e) for l in range(L) for e in range(E)}


@pytest.mark.parametrize("frac, on_miss", [(1.0, "wait"), (0.4, "base"), (0.3, "wait")])
def test_cuda_cache_serves_exact_planes(experts, frac, on_miss):
    cache = ExpertCache(OffloadConfig(gpu_budget_fraction=frac, on_miss=on_miss), SCHEME_LAYOUT, L, E, device="cuda")
    for (l, e), t in experts.items():
        cache.write_expert(l, e, t)
    assert cache.arena.buf.is_pinned()
    assert (cache.arena.pin_mode, cache.arena.pinned_bytes) == ("registered", cache.arena.nbytes), \
        "cudaHostRegister failed: the arena fell back to the power-of-two caching host allocator"
    cache.preload()
    tr = synth_trace(5, L, E, K, T, seed=11)
    for s in range(tr.num_steps):
        for l in range(L):
            view = cache.ensure(l, torch.from_numpy(tr.topk[s, l]).cuda())
            if l + 1 < L:
                cache.prefetch(l + 1, torch.from_numpy(tr.pred[s, l + 1]).cuda())
            assert torch.equal(view.tables[2].cpu(), torch.from_numpy(view.run_level.astype(np.int32)))
            for e in np.nonzero(view.run_level)[0]:
                got = view.expert_tensors(int(e))
                for name, tensor in got.items():      # read on the compute stream after ensure's waits
                    torch.testing.assert_close(tensor.cpu(), experts[(l, int(e))][name], **BIT_EXACT)
    torch.cuda.synchronize()                    # every stall event resolved: stats() and snapshot() agree
    snap = cache.stats()
    assert snap["stall_seconds"] >= 0 and sum(snap["plane_mix"].values()) == tr.topk.size
    metrics = sidechannel.validate("offload", cache.snapshot())     # the published payload, from CUDA events
    assert metrics["expert_stall_seconds"] == snap["stall_seconds"]


def _plan(layout, slots, layer_counts, evict_first: bool):
    st = Residency(2, E, slots)
    pol = Policy(OffloadConfig(on_miss="wait", lookahead=0), layout.plane_bytes, np.full((2, E), 4, np.int8))
    if evict_first:                            # fill the pool with layer 1 so layer 0's loads must evict
        c1 = np.ones(E, np.int64)
        st.observe(1, c1, 0)
        p1 = pol.plan(st, 1, c1)
        st.apply(p1)
    else:
        p1 = None
    counts = np.zeros(E, np.int64)
    counts[:layer_counts] = 1
    st.observe(0, counts, 1)
    plan = pol.plan(st, 0, counts)          # plans on a copy: ``st`` only learns the slots through apply()
    st.apply(plan)
    st.check()
    return p1, plan, st


def _engine(layout, slots):
    arena = HostArena(layout, 2, E, pin=True)
    arena.buf.random_(0, 256)
    eng = TransferEngine(arena, SlotPool(layout, slots, "cuda"))
    eng.timing = True
    return eng


def test_prefetch_copies_overlap_compute():
    layout, _ = qwen3_30b_a3b_layout()
    eng = _engine(layout, 2 * E)
    _, plan, _ = _plan(layout, 2 * E, E, evict_first=False)
    assert not any(op.kind == "evict" for op in plan.ops)
    done = torch.cuda.Event(enable_timing=True)
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(SLEEP_CYCLES)
    done.record()
    eng.execute(plan)
    copy_end = eng._timed[-1][1]
    copy_end.synchronize()
    assert not done.query(), "copies waited for the compute stream although nothing was evicted"
    torch.cuda.synchronize()
    assert start.elapsed_time(copy_end) < start.elapsed_time(done)


def test_evicting_plan_waits_for_compute_and_wait_orders_reads():
    layout, _ = qwen3_30b_a3b_layout()
    slots = E                                   # bases of one layer only: layer 0 must evict layer 1
    eng = _engine(layout, slots)
    p1, plan, st = _plan(layout, slots, E // 2, evict_first=True)
    eng.execute(p1)
    torch.cuda.synchronize()
    assert any(op.kind == "evict" for op in plan.ops)
    done = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)
    done.record()
    eng.execute(plan)
    eng.wait(0, plan.run_level)
    e0 = int(np.nonzero(plan.run_level)[0][0])
    slot = int(st.base_slot[0, e0])
    assert [op.slot for op in plan.loads if (op.layer, op.expert, op.level) == (0, e0, BASE)] == [slot]
    assert any(op.kind == "evict" and op.slot == slot for op in plan.ops), "the checked slot was not refilled"
    got = eng.pool.buf.clone()                  # compute stream, after wait(): every refilled slot
    torch.cuda.synchronize()
    assert done.elapsed_time(eng._timed[-1][0]) >= 0, "copies into evicted slots started before compute finished"
    pool = SlotPool(layout, slots, "cpu")
    pool.buf = got.cpu()
    torch.testing.assert_close(pool.blob(slot, BASE), eng.arena.blob(0, e0, BASE), **BIT_EXACT)
    for op in plan.loads:                       # slots as the residency records them, not as the plan says
        s_ = st.base_slot[0, op.expert] if op.level == BASE else st.upper_slot[0, op.expert]
        torch.testing.assert_close(pool.blob(s_, op.level), eng.arena.blob(0, op.expert, op.level), **BIT_EXACT)


def test_engine_bandwidth_is_reported():
    layout, _ = qwen3_30b_a3b_layout()
    eng = _engine(layout, 2 * E)
    _, plan, _ = _plan(layout, 2 * E, E, evict_first=False)
    eng.execute(plan)
    torch.cuda.synchronize()
    gbps = eng.bytes_issued / eng.busy_seconds() / 1e9
    assert gbps > 1.0, f"H2D copies at {gbps:.2f} GB/s: arena not pinned or copies synchronous"


def test_ensure_refuses_graph_capture():
    cache = ExpertCache(OffloadConfig(gpu_budget_fraction=0.5), SCHEME_LAYOUT, L, E, device="cuda")
    ids = torch.zeros(T, K, dtype=torch.int64, device="cuda")
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        with pytest.raises(RuntimeError, match="splitting op"):
            cache.ensure(0, ids)
