"""``slot_tables.fill_slot_einfo`` (host numpy) == ``slot_weights.slot_einfo`` (device torch, the reference) field by
field, for random residency tables with unrouted experts, -1 slots, every run level and per-projection caps; and the
offload runtime's ``slot_weights`` hands the kernels exactly those tables."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import PlaneLayout
from mxserve.scheduler.slot_tables import fill_slot_einfo
from mxserve.scheduler.traces import synth_trace
from mxserve.vllm_plugin.offload_method import OffloadRuntime
from mxserve_kernels._common.layout import NFIELDS
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe.slot_weights import slot_einfo

GU = WeightScheme(bits=4, group_size=32, nested=True)
DN = WeightScheme(bits=4, group_size=64, scale_dtype="fp16", nested=True)
LAYOUT = PlaneLayout(hidden=128, inter=64, gate_up=GU, down=DN)


@pytest.mark.parametrize("seed", range(4))
def test_host_einfo_equals_device_einfo(seed):
    rng = np.random.default_rng(seed)
    E, S = 32, 40
    lv = rng.choice([0, 2, 3, 4], size=E).astype(np.int8)
    base = np.where(lv > 0, rng.integers(0, S, E), -1).astype(np.int32)
    upper = np.where(lv > 2, rng.integers(0, S, E), -1).astype(np.int32)
    cap = rng.choice([2, 3, 4], size=E) if seed % 2 else None
    tables = torch.from_numpy(np.stack([base, upper, lv.astype(np.int32)]))
    for proj in ("gate_up", "down"):
        offs = LAYOUT.slot_offsets(proj)
        ref = slot_einfo(tables, offs, None if cap is None else torch.from_numpy(cap))
        out = np.full((E, NFIELDS), -7, np.int64)                       # stale contents are overwritten
        got = fill_slot_einfo(out, base, upper, lv, offs, cap)
        assert np.array_equal(got, ref.numpy()), (proj, np.argwhere(got != ref.numpy())[:5])


def test_host_einfo_rejects_a_wrong_buffer():
    with pytest.raises(ValueError, match=r"out must be int64 \[4, 11\]"):
        fill_slot_einfo(np.zeros((4, NFIELDS), np.int32), np.zeros(4), np.zeros(4), np.zeros(4),
                        LAYOUT.slot_offsets("down"))


def test_runtime_slot_weights_carry_the_reference_einfo():
    L, E, K = 3, 8, 2
    cfg = OffloadConfig(gpu_budget_fraction=0.3)
    rt = OffloadRuntime(cfg, {}, {})
    rt.cache = ExpertCache(cfg, LAYOUT, L, E, device="cpu", publish_interval_s=None)
    rt.cache.preload()
    rt.offsets = (LAYOUT.slot_offsets("gate_up"), LAYOUT.slot_offsets("down"))
    rt.wbf = torch.zeros(1, dtype=torch.bfloat16)
    caps = np.stack([np.full(E, 4), np.array([3, 4] * (E // 2))]).astype(np.int64)
    rt.caps_np[1] = caps
    tr = synth_trace(num_steps=4, num_layers=L, num_experts=E, top_k=K, tokens=3, seed=2)
    for s in range(tr.num_steps):
        for l in range(L):
            view = rt.cache.ensure(l, torch.from_numpy(tr.topk[s, l]))
            w = rt.slot_weights(l, view)
            for pw, offs, j in ((w.w13, rt.offsets[0], 0), (w.w2, rt.offsets[1], 1)):
                cap = torch.from_numpy(caps[j]) if l == 1 else None
                assert torch.equal(pw.einfo, slot_einfo(view.tables, offs, cap)), (s, l, j)
