"""Issue 7, hypothesis 2: with ``on_miss="wait"`` at the vLLM serve test's geometry (6 layers x 8 experts, top-2,
nested g128, ``gpu_budget_fraction`` 0.25 = 24 slots) every routed expert must run at its full target prefix, also
in prefill steps that route all 8 experts of a layer while the look-ahead wants all 8 of the next layer (16 slots
pinned for the current layer, the prefetch only takes what is left). Bookkeeping only (CPU pool, no GEMM)."""
from __future__ import annotations

import numpy as np
import torch

from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import PlaneLayout
from mxserve_kernels.formats import WeightScheme

L, E, TOPK = 6, 8, 2
SCHEME = WeightScheme(bits=4, group_size=128, nested=True)
LAYOUT = PlaneLayout(hidden=256, inter=128, gate_up=SCHEME, down=SCHEME)


def _ids(rng: np.random.Generator, t: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([rng.choice(E, TOPK, replace=False) for _ in range(t)]))


def test_wait_runs_every_routed_expert_at_target_under_full_prefill():
    cfg = OffloadConfig(gpu_budget_fraction=0.25, on_miss="wait", lookahead=1, policy="hebf")
    cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu", publish_interval_s=None)   # arena zeros: bookkeeping only
    cache.preload()
    assert cache.S == 24
    rng = np.random.default_rng(0)
    full = torch.arange(2 * E).remainder(E).reshape(E, TOPK)     # every expert routed
    for step, t in enumerate([64, 8, 8, 256, 8, 1, 64, 8]):
        for l in range(L):
            ids = torch.cat([full, _ids(rng, t)]) if step % 3 == 0 else _ids(rng, t)
            nxt = torch.cat([full, _ids(rng, t)]) if l + 1 < L else None
            view = cache.ensure(l, ids, next_ids=nxt)
            routed = np.bincount(ids.reshape(-1).numpy(), minlength=E) > 0
            assert (view.run_level[routed] == cache.target[l][routed]).all(), (step, l, view.run_level)
            assert (view.base_slot[routed] >= 0).all() and (view.upper_slot[routed] >= 0).all()
            cache.state.check()
    st = cache.stats()
    assert st["degraded"] == 0 and st["misses"] > 0 and st["prefetch_issued"] > 0, st


def test_wait_degrades_only_when_a_layer_cannot_fit():
    """The documented limit of "wait": a layer whose routed experts at full prefix exceed the pool (here 8 experts
    need 16 slots, the pool has 12) runs some below target, and ``degraded`` counts them."""
    cfg = OffloadConfig(gpu_budget_fraction=0.125, on_miss="wait", lookahead=0, policy="hebf")
    cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu", publish_interval_s=None)
    cache.preload()
    assert cache.S == 12
    ids = torch.arange(2 * E).remainder(E).reshape(E, TOPK)
    view = cache.ensure(0, ids)
    assert (view.run_level >= 2).all() and (view.run_level < 4).sum() == 2 * E - cache.S
    assert cache.stats()["degraded"] == 2 * E - cache.S
