"""Triton kernels under TRITON_INTERPRET=1 on CPU, tiny shapes with named edge cases. Not collected by the main
session (no ``test_`` prefix): ``test_kernels_moe.test_triton_kernels_under_interpreter`` runs it in a subprocess."""
from __future__ import annotations

import os

import pytest
import torch

from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe import fused_moe, prepare_experts
from mxserve_kernels.moe import reference as moe_ref
from mxserve_kernels.quant import dequant_linear, prepare_linear
from mxserve_kernels.quant import reference as qref
from mxserve_kernels._common.synth import random_canonical
from tests.tolerances import BIT_EXACT, GROUPED_GEMM_REL_MEAN, rel_mean_err
from tests.unit._kernel_cases import make_experts, make_routing
from tests.unit.test_kernels_moe import ALL_SCHEMES

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (see test_kernels_moe.py)", allow_module_level=True)


# (case name, T, K, schemes, H, I, routing kind, dtype, expert_map)
GRID = [
    ("T=1_topk=1", 1, 1, ["int4_g32_asym", "int2_g32_asym"], 64, 32, "random", torch.float32, False),
    ("mixed_all_kinds_T<block", 5, 3, ALL_SCHEMES[:8], 64, 64, "random", torch.float32, False),
    ("all_tokens_on_expert0", 17, 2, ["int3_g32_asym", "int8_g32_sym_fp16", "bf16"], 64, 32, "one_expert",
     torch.float32, False),
    ("empty_experts_non_pow2", 9, 2, ["int4_g32_asym", "int2_g32_asym_nested3"] * 3, 96, 96, "skip_half",
     torch.float32, False),
    ("topk=E", 3, 4, ["int2_g32_asym", "int4_g128_sym", "bf16", "int3_g64_sym"], 128, 128, "random", torch.float32,
     False),
    # fp16, not bf16: the interpreter truncates fp32 -> bf16 (a ~1% bias); bf16 runs in the GPU tier
    ("fp16_activations", 4, 2, ["int4_g32_asym", "int8_g64_asym", "bf16"], 64, 64, "random", torch.float16, False),
    ("expert_map", 6, 2, ["int4_g32_asym", "int2_g32_asym", "bf16"], 64, 32, "random", torch.float32, True),
]


@pytest.mark.parametrize("case", GRID, ids=[c[0] for c in GRID])
def test_fused_moe_triton_interpreter(case):
    _, t, k, schemes, h, i, kind, dtype, use_map = case
    e_local = len(schemes)
    e_global = 2 * e_local if use_map else e_local
    gate_up, down = make_experts(schemes, hidden=h, inter=i)
    w = prepare_experts(gate_up, down, hidden=h, inter=i)
    tw, ids = make_routing(t, k, e_global, kind)
    emap = None
    if use_map:  # even global ids live here as local id/2, odd ones are on another rank
        emap = torch.tensor([g // 2 if g % 2 == 0 else -1 for g in range(e_global)])
    x = torch.randn(t, h).to(dtype)
    want = moe_ref.fused_moe(x.float(), w, tw, ids, expert_map=emap)
    got = fused_moe(x, w, tw, ids, expert_map=emap)
    assert got.dtype == dtype and got.shape == (t, h)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[dtype]


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_dequant_linear_in_kernel_dequant_bit_exact(name):
    """x = identity (fp32, exact dot) makes the kernel output its dequantized W^T: compare to the canonical oracle."""
    s = WeightScheme.parse(name)
    t = random_canonical(s, 40, 128, generator=torch.Generator().manual_seed(1))
    lw = prepare_linear(s, t, k=128)
    eye = torch.eye(128)
    got = dequant_linear(eye, lw)
    torch.testing.assert_close(got.t(), qref.dequantize(s, t, 128), **BIT_EXACT)


@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (37, torch.float32), (5, torch.float16),
                                     (70, torch.float16)])  # M >= LINEAR_DEQUANT_ROWS: dequant-to-bf16 path
def test_dequant_linear_vs_reference(m, dtype):
    s = WeightScheme.parse("int3_g32_asym")
    lw = prepare_linear(s, random_canonical(s, 72, 96, generator=torch.Generator().manual_seed(2)), k=96)
    x = torch.randn(m, 96).to(dtype)
    bias = torch.randn(72)
    got = dequant_linear(x, lw, bias)
    want = qref.dequant_linear(x.float(), lw, bias)
    from mxserve_kernels.quant.linear import LINEAR_DEQUANT_ROWS
    tol = GROUPED_GEMM_REL_MEAN[torch.bfloat16 if m >= LINEAR_DEQUANT_ROWS else dtype]  # bf16-rounded weights
    assert got.dtype == dtype and rel_mean_err(want, got.float()) < tol


@pytest.mark.parametrize("t,k,e,block_m,use_map", [(1, 1, 4, 16, False), (7, 3, 5, 16, False), (33, 4, 4, 16, False),
                                                   (5, 2, 6, 32, True), (64, 8, 128, 16, False),
                                                   (100, 8, 60, 64, True), (3, 8, 8, 16, False)])
def test_moe_align_triton_equals_torch(t, k, e, block_m, use_map):
    """The one-launch Triton routing kernel reproduces the torch tile map exactly (incl. dropped pairs, topk = E)."""
    from mxserve_kernels.moe.routing import moe_align
    e_glob = 2 * e if use_map else e
    _, ids = make_routing(t, k, e_glob, "random", seed=t)
    emap = torch.tensor([g // 2 if g % 2 == 0 else -1 for g in range(e_glob)]) if use_map else None
    a = moe_align(ids, e, block_m, emap, use_triton=True)
    b = moe_align(ids, e, block_m, emap, use_triton=False)
    assert torch.equal(a.num_post, b.num_post)
    assert torch.equal(a.block_expert, b.block_expert)
    assert torch.equal(a.sorted_ids, b.sorted_ids)


@pytest.mark.parametrize("schemes", [["int4_g32_asym", "int1_g32_asym", "bf16", "int3_g64_sym"],
                                     ["int2_g32_asym_nested4", "int8_g32_sym_fp16", "int2_g32_asym_nested3"]])
def test_dequant_bf16_prefill_path(schemes):
    """Prefill path: dequant kernel == oracle cast to bf16, and fused_moe through it matches the reference."""
    import importlib
    fm = importlib.import_module("mxserve_kernels.moe.fused_moe")  # the module (the package exports the function)
    from mxserve_kernels.moe.grouped_gemm import dequant_bf16
    from mxserve_kernels._common.layout import dequant_expert
    h, i = 64, 320  # K = 320 is not a multiple of the 256-row dequant step
    gate_up, down = make_experts(schemes, hidden=h, inter=i)
    w = prepare_experts(gate_up, down, hidden=h, inter=i)
    for proj, canon, kdim in ((w.w13, gate_up, h), (w.w2, down, i)):
        d = dequant_bf16(proj)
        for e, (s, t) in enumerate(canon):  # one bf16 rounding of the fp32 oracle (the interpreter truncates)
            want = qref.dequantize(s, t, kdim)
            err = (dequant_expert(d, e) - want).abs()
            assert (err <= want.abs() * torch.finfo(torch.bfloat16).eps).all(), (s.name, float(err.max()))
    tw, ids = make_routing(40, 2, len(schemes), "random")
    x = torch.randn(40, h).to(torch.float16)  # 16-bit activations take the path (fp32 keeps fp32 weights)
    old = fm.PREFILL_DEQUANT_ROWS
    fm.PREFILL_DEQUANT_ROWS = 1
    try:
        got = fused_moe(x, w, tw, ids)
    finally:
        fm.PREFILL_DEQUANT_ROWS = old
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_fused_moe_fma_config(block_m):
    """The FMA K loop (decode configs, BLOCK_M < 16 allowed) matches the reference for every kind incl. bf16."""
    schemes = ALL_SCHEMES[:8]
    h, i = 64, 64
    w = prepare_experts(*make_experts(schemes, hidden=h, inter=i), hidden=h, inter=i)
    tw, ids = make_routing(5, 3, len(schemes), "random")
    x = torch.randn(5, h).to(torch.float16)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, FMA=1)
    got = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.float16]


@pytest.mark.parametrize("split,fma", [(2, 0), (4, 1), (16, 0)])
def test_fused_moe_split_k(split, fma):
    """Split-K (fp32 partials + reduce launch; K = 128 / 64 in 32-row ranges, so S=16 is clamped to 4 / 2 splits)
    matches the reference for every kind incl. bf16, in both projections (SiLU-and-mul applied after the sum)."""
    schemes = ALL_SCHEMES[:8]
    h, i = 128, 64
    w = prepare_experts(*make_experts(schemes, hidden=h, inter=i), hidden=h, inter=i)
    tw, ids = make_routing(5, 3, len(schemes), "random")
    x = torch.randn(5, h).to(torch.float16)
    cfg = dict(BLOCK_M=4 if fma else 16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, FMA=fma, SPLIT_K=split)
    got = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.float16]


@pytest.mark.parametrize("split,block_k,h,i", [(1, 16, 64, 64), (2, 32, 128, 64), (1, 16, 192, 64)])
def test_fused_moe_ktile(split, block_k, h, i):
    """KT configs (all code slots of a step dequantized into one K-ordered tile, one tl.dot per step) match the
    reference for every kind incl. nested planes and bf16, with split-K, and with K not a multiple of the step
    (192 rows against 128-row steps: the tail is masked)."""
    schemes = ALL_SCHEMES[:8]
    w = prepare_experts(*make_experts(schemes, hidden=h, inter=i), hidden=h, inter=i)
    tw, ids = make_routing(5, 3, len(schemes), "random")
    x = torch.randn(5, h).to(torch.float16)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=block_k, num_warps=4, num_stages=2, SPLIT_K=split, KT=1)
    got = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.float16]
    exact = fused_moe(x.float(), w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})  # fp32: exact dot, same sum
    assert rel_mean_err(moe_ref.fused_moe(x.float(), w, tw, ids), exact) < GROUPED_GEMM_REL_MEAN[torch.float32]


def test_dequant_linear_split_k():
    """The dense path (one expert, identity tile map) with SPLIT_K: same result as without, within fp32 order."""
    from mxserve_kernels.quant.linear import linear_config
    s = WeightScheme.parse("int4_g64_asym")
    lw = prepare_linear(s, random_canonical(s, 48, 256, generator=torch.Generator().manual_seed(3)), k=256)
    x = torch.randn(3, 256).to(torch.float16)
    base = linear_config(lw, 3)
    got = dequant_linear(x, lw, config={**base, "SPLIT_K": 4})
    want = dequant_linear(x, lw, config=base)
    assert rel_mean_err(want.float(), got.float()) < GROUPED_GEMM_REL_MEAN[torch.float16]


@pytest.mark.parametrize("block_m, fma", [(16, 0), (2, 1)])
def test_plane_scales_elsewhere_via_pmoff(block_m, fma):
    """Nested experts whose plane scales / sign planes live in another buffer region (einfo PMOFF, PWSTEP, PMSTEP,
    as in the offload slot pool): the grouped GEMM and the dequant kernel equal the reference on the packed layout."""
    from mxserve_kernels.moe.grouped_gemm import dequant_bf16
    from mxserve_kernels.moe.weights import MoEWeights
    from mxserve_kernels._common.layout import dequant_expert
    from tests.unit.test_kernels_moe import relocate_planes
    schemes = ["int2_g32_asym_nested4", "int4_g32_asym", "int2_g32_asym_nested3", "int2_g64_asym_fp16_nested4"]
    h, i = 128, 64
    gate_up, down = make_experts(schemes, hidden=h, inter=i)
    w = prepare_experts(gate_up, down, hidden=h, inter=i)
    moved = MoEWeights(relocate_planes(w.w13), relocate_planes(w.w2), h, i)
    tw, ids = make_routing(5, 2, len(schemes), "random")
    x = torch.randn(5, h)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, FMA=fma)
    got = fused_moe(x, moved, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
    want = moe_ref.fused_moe(x, w, tw, ids)
    assert rel_mean_err(want, got) < GROUPED_GEMM_REL_MEAN[torch.float32]
    for proj, canon, kdim in ((moved.w13, gate_up, h), (moved.w2, down, i)):
        d = dequant_bf16(proj)
        for e, (s, t) in enumerate(canon):
            ref = qref.dequantize(s, t, kdim)
            err = (dequant_expert(d, e) - ref).abs()
            assert (err <= ref.abs() * torch.finfo(torch.bfloat16).eps).all(), (s.name, float(err.max()))


def test_grouped_gemm_over_offload_slot_pool():
    """The Triton grouped GEMM reading an offload slot pool (``slot_weights``: uint8 pool viewed as qw/pw/meta,
    einfo from the residency tables, run levels 2 / 3 / 4) equals the reference on the same einfo."""
    import numpy as np
    from mxserve.scheduler.config import OffloadConfig
    from mxserve.scheduler.expert_cache import ExpertCache
    from mxserve.scheduler.layout import PlaneLayout
    from mxserve_kernels.moe.slot_weights import slot_moe_weights
    gu_s = WeightScheme(bits=4, group_size=32, nested=True)
    dn_s = WeightScheme(bits=4, group_size=32, scale_dtype="fp16", nested=True)
    h, i, e_n = 64, 64, 4
    lay = PlaneLayout(hidden=h, inter=i, gate_up=gu_s, down=dn_s)
    cache = ExpertCache(OffloadConfig(), lay, 1, e_n, device="cpu", publish_interval_s=None)
    g = torch.Generator().manual_seed(0)
    for e in range(e_n):
        gu, dn = random_canonical(gu_s, 2 * i, h, generator=g), random_canonical(dn_s, h, i, generator=g)
        cache.write_expert(0, e, {**{f"gate_up.{k}": v for k, v in gu.items()},
                                  **{f"down.{k}": v for k, v in dn.items()}})
    cache.preload()
    levels = np.array([2, 3, 4, 3], np.int32)
    tables = torch.stack([torch.from_numpy(cache.state.base_slot[0].astype(np.int32)),
                          torch.from_numpy(cache.state.upper_slot[0].astype(np.int32)), torch.from_numpy(levels)])
    w = slot_moe_weights(cache.pool.buf, tables, lay.slot_offsets("gate_up"), lay.slot_offsets("down"))
    tw, ids = make_routing(6, 2, e_n, "random")
    x = torch.randn(6, h)
    got = fused_moe(x, w, tw, ids)
    want = moe_ref.fused_moe(x, w, tw, ids)
    assert rel_mean_err(want, got) < GROUPED_GEMM_REL_MEAN[torch.float32]
