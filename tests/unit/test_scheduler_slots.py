"""The grouped GEMM's view of the offload slot pool (``mxserve_kernels.moe.slot_weights``) on a CPU ExpertCache:
``einfo`` built from ``view.tables`` addresses exactly the planes the cache made resident, so the MoE reference
through the slot pool equals the one through ordinary ``prepare_experts`` weights at the same run levels
(int2 base only, base + plane 3, all planes), bit-exactly (same fp32 dequantization)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import LEVELS, PlaneLayout
from mxserve.scheduler.traces import synth_trace
from mxserve_kernels._common.layout import F_KIND, KIND_NONE, dequant_expert
from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe import prepare_experts
from mxserve_kernels.moe import reference as moe_ref
from mxserve_kernels.moe.slot_weights import (
    SLOT_KINDS,
    SlotOffsets,
    slot_einfo,
    slot_moe_weights,
)
from mxserve_kernels.quant.reference import dequantize
from tests.tolerances import BIT_EXACT

L, E, TOPK, T, H, I = 3, 8, 2, 5, 128, 64
GU = WeightScheme(bits=4, group_size=32, nested=True)
DN = WeightScheme(bits=4, group_size=64, scale_dtype="fp16", nested=True)
LAYOUT = PlaneLayout(hidden=H, inter=I, gate_up=GU, down=DN)


def _prefix(t: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in t.items() if not k.startswith("plane") or int(k[5]) <= bits}


@pytest.fixture(scope="module")
def experts():
    """(l, e) -> (gate_up canonical, down canonical) of scheme ``nested4`` (all planes)."""
    g = torch.Generator().manual_seed(0)
    return {(l, e): (random_canonical(GU, 2 * I, H, generator=g), random_canonical(DN, H, I, generator=g))
            for l in range(L) for e in range(E)}


def _cache(experts, frac: float, on_miss: str = "base") -> ExpertCache:
    cache = ExpertCache(OffloadConfig(gpu_budget_fraction=frac, on_miss=on_miss), LAYOUT, L, E, device="cpu",
                        publish_interval_s=None)
    for (l, e), (gu, dn) in experts.items():
        cache.write_expert(l, e, {**{f"gate_up.{k}": v for k, v in gu.items()},
                                  **{f"down.{k}": v for k, v in dn.items()}})
    cache.preload()
    return cache


def _reference_weights(experts, layer: int, run_level: np.ndarray):
    """prepare_experts of layer ``layer`` with expert e at prefix ``run_level[e]`` (unrouted: full, unused)."""
    gu, dn = [], []
    for e in range(E):
        bits = int(run_level[e]) or LEVELS[-1]
        sg = WeightScheme(bits=bits, group_size=GU.group_size, scale_dtype=GU.scale_dtype, nested=True)
        sd = WeightScheme(bits=bits, group_size=DN.group_size, scale_dtype=DN.scale_dtype, nested=True)
        gu.append((sg, _prefix(experts[(layer, e)][0], bits)))
        dn.append((sd, _prefix(experts[(layer, e)][1], bits)))
    return prepare_experts(gu, dn, hidden=H, inter=I)


def test_offsets_and_einfo_fields():
    offs = LAYOUT.slot_offsets("down")
    assert (offs.n, offs.k, offs.group_size, offs.scale_dtype) == (H, I, 64, "fp16")
    assert offs.plane_step == LAYOUT.plane_bytes[3] and offs.slot_bytes == LAYOUT.slot_bytes
    tables = torch.tensor([[0, 3, 1, -1], [-1, 2, 5, -1], [2, 3, 4, 0]], dtype=torch.int32)
    info = slot_einfo(tables, offs)
    assert info[3, F_KIND] == KIND_NONE and info.shape == (4, 11)
    # base offsets scale with the base slot, plane offsets with the upper slot
    assert int(info[1, 3] - info[0, 3]) * 64 == 3 * LAYOUT.slot_bytes       # QOFF (int32 OFF_UNIT = 64 B)
    assert int(info[2, 8] - info[1, 8]) * 2 == 3 * LAYOUT.slot_bytes        # PMOFF (fp16 elements)
    assert SLOT_KINDS == 4 | 64 | 128
    with pytest.raises(ValueError, match="plane_words"):
        SlotOffsets(n=8, k=32, group_size=32, scale_dtype="bf16", slot_bytes=1024, qweight=0, meta=0,
                    plane_words=4, plane_scales=0, plane_step=512)


def test_forced_run_levels_match_prepare_experts(experts):
    """All planes resident; tables rewritten to run levels 2 / 3 / 4 / 0 per expert."""
    cache = _cache(experts, 1.0)
    levels = np.array([2, 3, 4, 0, 4, 2, 3, 2])
    layer = 1
    tables = torch.stack([torch.from_numpy(cache.state.base_slot[layer].astype(np.int32)),
                          torch.from_numpy(cache.state.upper_slot[layer].astype(np.int32)),
                          torch.from_numpy(levels.astype(np.int32))])
    w = slot_moe_weights(cache.pool.buf, tables, LAYOUT.slot_offsets("gate_up"), LAYOUT.slot_offsets("down"))
    ref = _reference_weights(experts, layer, levels)
    for e in range(E):
        if levels[e] == 0:
            continue
        sg = WeightScheme(bits=int(levels[e]), group_size=32, nested=True)
        torch.testing.assert_close(dequant_expert(w.w13, e), dequantize(sg, _prefix(experts[(layer, e)][0],
                                                                                  int(levels[e])), H), **BIT_EXACT)
        torch.testing.assert_close(dequant_expert(w.w2, e), dequant_expert(ref.w2, e), **BIT_EXACT)
    routed = torch.tensor([e for e in range(E) if levels[e]])
    g = torch.Generator().manual_seed(1)
    ids = routed[torch.stack([torch.randperm(len(routed), generator=g)[:TOPK] for _ in range(T)])]
    tw = torch.rand(T, TOPK, generator=g)
    x = torch.randn(T, H, generator=g)
    torch.testing.assert_close(moe_ref.fused_moe(x, w, tw, ids), moe_ref.fused_moe(x, ref, tw, ids), **BIT_EXACT)


@pytest.mark.parametrize("frac", [0.3, 0.6])
def test_ensure_then_slot_gemm_matches_prepare_experts(experts, frac):
    """Tight budgets (evictions, on_miss=base degrades to prefix 2/3): every step's slot-pool MoE equals the
    reference at the run levels ``ensure`` reported."""
    cache = _cache(experts, frac)
    tr = synth_trace(4, L, E, TOPK, T, seed=5)
    g = torch.Generator().manual_seed(2)
    seen = set()
    offs = LAYOUT.slot_offsets("gate_up"), LAYOUT.slot_offsets("down")
    for s in range(tr.num_steps):
        for l in range(L):
            ids = torch.from_numpy(tr.topk[s, l])
            nxt = torch.from_numpy(tr.pred[s, l + 1]) if l + 1 < L else None
            view = cache.ensure(l, ids, next_ids=nxt)
            w = slot_moe_weights(view.pool.buf, view.tables, *offs)
            ref = _reference_weights(experts, l, view.run_level)
            x = torch.randn(T, H, generator=g)
            tw = torch.rand(T, TOPK, generator=g)
            torch.testing.assert_close(moe_ref.fused_moe(x, w, tw, ids), moe_ref.fused_moe(x, ref, tw, ids),
                                       **BIT_EXACT)
            seen.update(int(v) for v in view.run_level[view.run_level > 0])
    assert cache.stats()["bytes_moved"] > 0
    assert seen >= {4} and len(seen) >= 2, seen     # degraded and full-prefix experts both exercised
