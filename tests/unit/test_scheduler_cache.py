"""ExpertCache + transfer engine bookkeeping on a CPU device (synchronous copies): every routed expert's slot views
hold exactly its arena bytes at its run prefix, and dequantize bit-exactly like the original canonical tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mxserve.scheduler.bench import synthetic_expert
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import BASE, PlaneLayout
from mxserve.scheduler.traces import synth_trace
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant.reference import dequantize
from tests.tolerances import BIT_EXACT

L, E, K, T, H, I = 4, 16, 4, 6, 256, 128
SCHEME = WeightScheme(bits=4, group_size=64, nested=True)
LAYOUT = PlaneLayout(hidden=H, inter=I, gate_up=SCHEME, down=SCHEME)


def _proj(tensors: dict[str, torch.Tensor], proj: str) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(proj + ".")}


@pytest.fixture(scope="module")
def experts():
    return {(l, e): synthetic_expert(LAYOUT, seed=l * E + e) for l in range(L) for e in range(E)}


@pytest.mark.parametrize("policy, frac, on_miss", [("hebf", 1.0, "wait"), ("hebf", 0.4, "base"),
                                                   ("lru", 0.4, "wait"), ("none", 0.3, "base")])
def test_cache_serves_exact_planes(experts, policy, frac, on_miss):
    cfg = OffloadConfig(gpu_budget_fraction=frac, policy=policy, on_miss=on_miss, lookahead=1)
    cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu")
    for (l, e), t in experts.items():
        cache.write_expert(l, e, t)
    cache.preload()
    tr = synth_trace(6, L, E, K, T, seed=3)
    checked = 0
    for s in range(tr.num_steps):
        for l in range(L):
            ids = torch.from_numpy(tr.topk[s, l])
            view = cache.ensure(l, ids)
            if l + 1 < L:
                cache.prefetch(l + 1, torch.from_numpy(tr.pred[s, l + 1]))
            routed = set(int(x) for x in ids.reshape(-1))
            assert set(np.nonzero(view.run_level)[0].tolist()) == routed
            assert torch.equal(view.tables[2], torch.from_numpy(view.run_level.astype(np.int32)))
            for e in sorted(routed)[:3]:
                lv = int(view.run_level[e])
                assert lv >= BASE
                got = view.expert_tensors(e)
                want = cache.arena.expert_tensors(l, e, lv)
                assert got.keys() == want.keys()
                for name in got:
                    torch.testing.assert_close(got[name], experts[(l, e)][name], **BIT_EXACT)
                if s > 0 or e != min(routed):     # the byte check above covers the rest; dequant is slow on CPU
                    checked += 1
                    continue
                for proj, (n, k) in (("gate_up", (2 * I, H)), ("down", (H, I))):
                    sch = WeightScheme(bits=lv, group_size=SCHEME.group_size, nested=True)
                    torch.testing.assert_close(dequantize(sch, _proj(got, proj), k),
                                               dequantize(sch, _proj(experts[(l, e)], proj), k), **BIT_EXACT)
                checked += 1
            cache.state.check()
            assert cache.state.slots_used <= cache.S
    snap = cache.stats()
    assert snap["hits"] + snap["misses"] == sum(len(set(tr.topk[s, l].ravel().tolist()))
                                                for s in range(tr.num_steps) for l in range(L))
    assert sum(snap["plane_mix"].values()) == tr.topk.size
    assert checked > 50
    if frac == 1.0:
        assert snap["bytes_moved"] == 0 and snap["misses"] == 0   # preload made everything resident
    else:
        assert snap["bytes_moved"] > 0
    if on_miss == "wait":
        assert snap["degraded"] == 0


def test_arena_rejects_bad_tensor(experts):
    cache = ExpertCache(OffloadConfig(gpu_budget_fraction=0.5), LAYOUT, L, E, device="cpu")
    t = dict(experts[(0, 0)])
    t["down.plane3_scales"] = t["down.plane3_scales"].float()
    with pytest.raises(ValueError, match=r"'down.plane3_scales' is torch.float32"):
        cache.write_expert(0, 0, t)
    del t["gate_up.zeros"]
    with pytest.raises(ValueError, match="missing tensor 'gate_up.zeros'"):
        cache.write_expert(0, 0, t)


def test_prefetch_only_for_lookahead_layers(experts):
    cfg = OffloadConfig(gpu_budget_fraction=0.5, lookahead=1)
    cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu")
    ids = torch.tensor([[0, 1, 2, 3]])
    assert cache.prefetch(1, ids) == 0                  # nothing computed yet
    cache.ensure(0, ids)
    assert cache.prefetch(2, ids) == 0                  # beyond the look-ahead depth
    assert cache.prefetch(1, ids) == 4 * LAYOUT.expert_bytes
    assert (cache.state.level[1, :4] == 4).all()


def test_snapshot_is_the_sidechannel_payload(experts, tmp_path):
    from mxserve.metrics import sidechannel
    from mxserve.metrics.definitions import WORKER_METRICS
    cfg = OffloadConfig(gpu_budget_fraction=0.4, lookahead=1, on_miss="base")
    cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu", publish_interval_s=0.0)
    for (l, e), t in experts.items():
        cache.write_expert(l, e, t)
    cache.preload()
    tr = synth_trace(4, L, E, K, T, seed=5)
    for s in range(tr.num_steps):
        for l in range(L):
            cache.ensure(l, torch.from_numpy(tr.topk[s, l]))
            if l + 1 < L:
                cache.prefetch(l + 1, torch.from_numpy(tr.pred[s, l + 1]))
    snap, stats = cache.snapshot(), cache.stats()
    assert set(snap) <= set(WORKER_METRICS)
    assert sidechannel.validate("offload", snap) == sidechannel.validate("offload", snap)   # raises on a bad key
    assert (snap["expert_cache_hits"], snap["expert_cache_misses"], snap["expert_h2d_bytes"]) == \
        (stats["hits"], stats["misses"], stats["bytes_moved"])
    lv = cache.state.level
    assert snap["resident_experts"] == int((lv > 0).sum()) == sum(snap["resident_planes"].values())
    assert snap["resident_planes"]["4"] == int((lv == 4).sum()) and snap["host_pinned_bytes"] == cache.arena.pinned_bytes
    assert 0 < snap["prefetch_useful"] <= snap["prefetch_issued"]
    # ensure() of the last layer published it: the side channel holds this section (written on flush)
    path = sidechannel.flush(str(tmp_path))
    import json
    with open(path) as f:
        assert json.load(f)["sections"]["offload"] == sidechannel.validate("offload", snap)


def test_prefetch_useful_counts_routed_prefetched_experts(experts):
    cfg = OffloadConfig(gpu_budget_fraction=0.5, lookahead=1, on_miss="wait")     # "wait": no backfill loads
    cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu", publish_interval_s=None)
    cache.ensure(0, torch.tensor([[0, 1, 2, 3]]))
    cache.prefetch(1, torch.tensor([[4, 5, 6, 7]]))
    assert cache.snapshot()["prefetch_issued"] == 4 and cache.snapshot()["prefetch_useful"] == 0
    cache.ensure(1, torch.tensor([[4, 5, 8, 9]]))
    assert cache.snapshot()["prefetch_useful"] == 2
    cache.ensure(1, torch.tensor([[4, 5, 6, 9]]))              # 6 was prefetched, 4/5 already counted
    assert cache.snapshot()["prefetch_useful"] == 3


def test_ensure_with_next_ids_equals_ensure_then_prefetch(experts):
    cfg = OffloadConfig(gpu_budget_fraction=0.3, lookahead=1, on_miss="base")
    a, b = (ExpertCache(cfg, LAYOUT, L, E, device="cpu", publish_interval_s=None) for _ in range(2))
    tr = synth_trace(3, L, E, K, T, seed=21)
    for s in range(tr.num_steps):
        for l in range(L):
            ids, nxt = torch.from_numpy(tr.topk[s, l]), torch.from_numpy(tr.pred[s, (l + 1) % L])
            a.ensure(l, ids)
            if l + 1 < L:
                a.prefetch(l + 1, nxt)
            b.ensure(l, ids, next_ids=nxt)          # the last layer ignores next_ids (no layer L)
            for name in ("level", "base_slot", "upper_slot"):
                assert np.array_equal(getattr(a.state, name), getattr(b.state, name)), (s, l, name)
    assert a.stats() == b.stats() and a.stats()["prefetch_bytes"] > 0
