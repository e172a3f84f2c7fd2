"""The offload path compiles nothing after its load-time warm-up: every Triton binary ``fused_moe`` launches over
the slot pool while a router trace replays through a CPU ``ExpertCache`` (misses, evictions, experts degraded to
their int2 base, per-projection prefix caps, several token counts) is one the warm-up forwards
(``OffloadRuntime.warm_weights`` at ``warmup.moe_token_counts``, what ``OffloadRuntime.warm`` runs on the GPU) also
launch. Keys come from Triton's own binder (the recorder of ``test_kernel_warmup_counts``)."""
from __future__ import annotations

import pytest
import torch

from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import LEVELS, PlaneLayout
from mxserve.scheduler.traces import synth_trace
from mxserve.vllm_plugin.offload_method import OffloadRuntime
from mxserve_kernels import warmup
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe import fused_moe
from mxserve_kernels.moe.slot_weights import slot_moe_weights
from tests.unit.test_kernel_warmup_counts import keys_at  # noqa: F401  (fixture)

L, E, K, H, I = 3, 16, 4, 256, 128
S4 = WeightScheme(bits=4, group_size=128, nested=True)
LAYOUT = PlaneLayout(hidden=H, inter=I, gate_up=S4, down=S4)
TOKENS = (1, 2, 5, 8, 33, 64)


def _runtime(h2d_gbps: float) -> OffloadRuntime:
    """An OffloadRuntime around a CPU cache at a 25% budget (zero weights: no kernel runs, only keys matter)."""
    cfg = OffloadConfig(gpu_budget_fraction=0.25, on_miss="base", h2d_gbps=h2d_gbps)
    rt = OffloadRuntime(cfg, {}, {})
    rt.cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu", publish_interval_s=None)
    rt.cache.preload()
    rt.offsets = (LAYOUT.slot_offsets("gate_up"), LAYOUT.slot_offsets("down"))
    rt.wbf = torch.zeros(1, dtype=torch.bfloat16)
    return rt


def _served_keys(keys_at, rt: OffloadRuntime, levels_seen: set) -> frozenset:  # noqa: F811
    """Keys of every fused_moe the offload path launches over a trace at each of TOKENS."""
    out: set = set()
    caps = (torch.tensor([4, 3] * (E // 2)), torch.tensor([3, 4, 2, 4] * (E // 4)))   # gate_up / down differ
    for t in TOKENS:
        tr = synth_trace(3, L, E, K, t, seed=t)
        for s in range(tr.num_steps):
            for l in range(L):
                ids = torch.from_numpy(tr.topk[s, l]).to(torch.int32)
                nxt = torch.from_numpy(tr.pred[s, l + 1]) if l + 1 < L else None
                view = rt.cache.ensure(l, ids, next_ids=nxt)
                levels_seen.update(int(v) for v in view.run_level)
                w = slot_moe_weights(view.pool.buf, view.tables, *rt.offsets, wbf=rt.wbf,
                                     caps=caps if l == 1 else None)
                x = torch.zeros(t, H, dtype=torch.bfloat16)
                out |= keys_at(lambda x=x, w=w, t=t, ids=ids: fused_moe(x, w, torch.full((t, K), 1.0 / K), ids,
                                                                        activation="silu"))
    return frozenset(out)


def _warm_keys(keys_at, rt: OffloadRuntime, counts: list[int]) -> frozenset:  # noqa: F811
    w = rt.warm_weights()
    out: set = set()
    for t in counts:
        x = torch.zeros(t, H, dtype=torch.bfloat16)
        out |= keys_at(lambda x=x, t=t: fused_moe(x, w, torch.full((t, K), 1.0 / K),
                                                  warmup._spread_ids(t, K, E, "cpu"), activation="silu"))
    return frozenset(out)


@pytest.mark.parametrize("h2d_gbps", [50.0, 1e-4], ids=["fast_link", "degrading_link"])
def test_offload_trace_launches_only_warmed_binaries(keys_at, h2d_gbps):  # noqa: F811
    rt = _runtime(h2d_gbps)
    seen: set = set()
    served = _served_keys(keys_at, rt, seen)
    assert {0, LEVELS[0]} <= seen and (h2d_gbps < 1 or LEVELS[-1] in seen), f"trace run levels {sorted(seen)}"
    counts = warmup.moe_token_counts(rt.warm_weights(), K, max(TOKENS))
    warmed = _warm_keys(keys_at, rt, counts)
    missing = served - warmed
    assert not missing, f"{len(missing)} offload binaries not compiled by the warm-up (T={counts}): {sorted(missing)}"
    # the check has teeth: T=1 alone leaves binaries of the larger token counts uncompiled
    assert served - _warm_keys(keys_at, rt, [1])
    c = rt.cache.stats()
    assert c["misses"] > 0 and (h2d_gbps > 1 or c["degraded"] > 0), c
