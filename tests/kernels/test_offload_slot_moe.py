"""GPU tier (no vLLM): ``ExpertCache`` + ``fused_moe`` over the slot pool must equal the resident ``fused_moe`` bit
for bit, step after step, under eviction pressure, look-ahead prefetch and deliberately slow streams (issue 7).

Geometry = the vLLM serve test (``tests/integration/test_offload_vllm.py``): 6 MoE layers x 8 experts, top-2,
H 256, I 128, nested int2 + 2 planes (g128), ``gpu_budget_fraction`` 0.25 (24 slots, 16 per fully routed layer),
``on_miss="wait"``, hebf, look-ahead 1 with a deliberately poor predictor (misses + evictions every step).
Both sides run the same launch config and the same prefill-dequant decision (decode T=8, mixed T=64, prefill
T=256 >= PREFILL_DEQUANT_ROWS rows per expert), so any difference is the cache's (a race or a wrong slot), except
in ``test_kinds_mask_is_numerically_neutral``, which isolates the one remaining difference between the two paths:
the resident projection's KINDS mask (nested+2 only) vs the slot pool's ``SLOT_KINDS`` (int2 | nested+1 | nested+2).

Run: ``MXSERVE_TEST_JSON=$OUT/offload_slot_moe.json pytest -q -m gpu tests/kernels/test_offload_slot_moe.py``
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import PlaneLayout
from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe import fused_moe, prepare_experts
from mxserve_kernels.moe.fused_moe import moe_config
from mxserve_kernels.moe.slot_weights import SLOT_KINDS, slot_moe_weights
from mxserve_kernels.moe.weights import MoEWeights
from tests.helpers.results import record_result

pytestmark = pytest.mark.gpu

L, E, TOPK, H, I = 6, 8, 2, 256, 128
SCHEME = WeightScheme(bits=4, group_size=128, nested=True)
LAYOUT = PlaneLayout(hidden=H, inter=I, gate_up=SCHEME, down=SCHEME)
CFG = OffloadConfig(gpu_budget_fraction=0.25, on_miss="wait", lookahead=1, policy="hebf")
STEPS = [256, 8, 8, 64, 8, 256, 8, 64, 8, 8]          # tokens per step: prefill (dequant path), decode, mixed
SLEEP_CYCLES = 20_000_000                               # ~10 ms GPU spin to let one stream run far ahead


def _with_kinds(w: MoEWeights, kinds: int) -> MoEWeights:
    return MoEWeights(dataclasses.replace(w.w13, kinds=kinds), dataclasses.replace(w.w2, kinds=kinds), w.hidden,
                      w.inter)


@pytest.fixture(scope="module")
def model():
    """(canonical experts {(l, e): tensors}, resident MoEWeights per layer, routers [L] of [E, H] on cuda)."""
    g = torch.Generator().manual_seed(7)
    experts, resident = {}, []
    for l in range(L):
        gu, dn = [], []
        for e in range(E):
            a, b = random_canonical(SCHEME, 2 * I, H, generator=g), random_canonical(SCHEME, H, I, generator=g)
            experts[(l, e)] = {**{f"gate_up.{k}": v for k, v in a.items()}, **{f"down.{k}": v for k, v in b.items()}}
            gu.append((SCHEME, {k: v.cuda() for k, v in a.items()}))
            dn.append((SCHEME, {k: v.cuda() for k, v in b.items()}))
        resident.append(prepare_experts(gu, dn, hidden=H, inter=I))
    routers = [torch.randn(E, H, generator=g).cuda().to(torch.bfloat16) for _ in range(L)]
    return experts, resident, routers


def _route(x: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, ids = torch.topk(torch.softmax((x @ router.t()).float(), dim=-1), TOPK, dim=-1)
    return (w / w.sum(-1, keepdim=True)).contiguous(), ids.to(torch.int32)


@pytest.mark.parametrize("einfo", ["device", "host"])
def test_slot_pool_moe_equals_resident(model, einfo):
    """einfo "device": ``slot_einfo`` from ``view.tables``; "host": ``OffloadRuntime.slot_weights`` (what vLLM's
    ``apply`` runs: tables filled in a pinned per-layer row and copied asynchronously; the slow compute stream of
    even steps would expose a row rewritten before its previous copy ran)."""
    from mxserve.vllm_plugin.offload_method import OffloadRuntime
    experts, resident, routers = model
    cache = ExpertCache(CFG, LAYOUT, L, E, device="cuda", publish_interval_s=None)
    for (l, e), t in experts.items():
        cache.write_expert(l, e, t)
    cache.preload()
    assert cache.S == 24, cache.S
    offs = LAYOUT.slot_offsets("gate_up"), LAYOUT.slot_offsets("down")
    rt = OffloadRuntime(CFG, {}, {})
    rt.cache, rt.offsets, rt.wbf = cache, offs, torch.zeros(1, dtype=torch.bfloat16, device="cuda")
    rt.alloc_einfo("cuda")
    g = torch.Generator(device="cuda").manual_seed(3)
    compute = torch.cuda.current_stream()
    mismatches, checked = [], 0
    for step, t in enumerate(STEPS):
        x = (torch.randn(t, H, generator=g, device="cuda") * 0.5).to(torch.bfloat16)
        for l in range(L):
            tw, ids = _route(x, routers[l])
            # poor predictor: the next router on noise-perturbed states (wrong experts -> prefetches get evicted)
            nxt = _route(x + torch.randn_like(x), routers[l + 1])[1] if l + 1 < L else None
            if step % 2:                 # slow copy stream: a GEMM that does not wait for its planes reads stale slots
                with torch.cuda.stream(cache.engine.stream):
                    torch.cuda._sleep(SLEEP_CYCLES)
            view = cache.ensure(l, ids, next_ids=nxt)
            routed = torch.bincount(ids.reshape(-1).long(), minlength=E).cpu().numpy() > 0
            assert (view.run_level[routed] == 4).all() and (view.run_level[~routed] == 0).all(), \
                f"step {step} layer {l}: run levels {view.run_level} (on_miss=wait must run every expert at 4)"
            if step % 2 == 0:            # slow compute stream: a copy that does not wait for earlier readers races
                torch.cuda._sleep(SLEEP_CYCLES)
            w = slot_moe_weights(view.pool.buf, view.tables, *offs) if einfo == "device" else rt.slot_weights(l, view)
            ref = _with_kinds(resident[l], SLOT_KINDS)
            cfg = moe_config(ref, t, TOPK)
            got = fused_moe(x, w, tw, ids, config=cfg)
            want = fused_moe(x, ref, tw, ids, config=cfg)
            checked += 1
            if not torch.equal(got, want):
                mismatches.append((step, t, l, float((got.float() - want.float()).abs().max())))
            x = (x.float() + got.float()).to(torch.bfloat16)      # next layer sees this layer's output
    torch.cuda.synchronize()
    assert compute == torch.cuda.current_stream()
    st = cache.stats()
    record_result(f"offload_slot_moe_{einfo}_einfo", {"checked": checked, "mismatches": mismatches, "stats": {
        k: st[k] for k in ("hits", "misses", "degraded", "bytes_moved", "prefetch_issued", "prefetch_useful")}})
    assert st["misses"] > 0 and st["prefetch_issued"] > 0 and st["degraded"] == 0, st
    assert not mismatches, f"{len(mismatches)}/{checked} layer-steps differ (step, T, layer, max|diff|): {mismatches}"


@pytest.mark.parametrize("t", [8, 64, 256])
def test_kinds_mask_is_numerically_neutral(model, t):
    """The resident projection compiled with its own KINDS mask vs with ``SLOT_KINDS`` (the slot pool's): the
    nested+2 K loop is the same code, so outputs must be identical. A failure here means the vLLM resident-vs-offload
    difference is (partly) codegen, not the cache."""
    _, resident, routers = model
    g = torch.Generator(device="cuda").manual_seed(5 + t)
    x = (torch.randn(t, H, generator=g, device="cuda") * 0.5).to(torch.bfloat16)
    tw, ids = _route(x, routers[0])
    w = resident[0]
    assert w.w13.kinds_mask != SLOT_KINDS
    cfg = moe_config(w, t, TOPK)
    a = fused_moe(x, w, tw, ids, config=cfg)
    b = fused_moe(x, _with_kinds(w, SLOT_KINDS), tw, ids, config=cfg)
    diff = float((a.float() - b.float()).abs().max())
    record_result(f"offload_kinds_mask_T{t}", {"max_abs_diff": diff, "natural_kinds": w.w13.kinds_mask})
    assert torch.equal(a, b), f"T={t}: max |diff| {diff:.3e} between KINDS {w.w13.kinds_mask} and {SLOT_KINDS}"

