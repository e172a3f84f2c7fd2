"""GPU tier: the Triton grouped GEMM / dequant GEMM vs the fp32 references over the issue's shape grid (real model
shapes with the expert count reduced to keep weight generation fast; E matters only for routing)."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe import fused_moe, prepare_experts
from mxserve_kernels.moe import reference as moe_ref
from mxserve_kernels.quant import dequant_linear, prepare_linear
from mxserve_kernels.quant import reference as qref
from tests.tolerances import BIT_EXACT, GROUPED_GEMM_REL_MEAN, rel_mean_err
from tests.unit._kernel_cases import make_routing

MIX = ["int4_g128_asym", "int2_g128_asym", "int3_g128_asym", "int8_g128_sym", "bf16", "int2_g128_asym_nested4",
       "int4_g64_sym_fp16", "int2_g32_asym_nested3", "int1_g128_asym"]

# (case, T, K, E, H, I, routing kind, schemes cycled over experts)
GRID = [
    ("T=1", 1, 8, 16, 2048, 768, "random", MIX),
    ("T<block", 5, 4, 8, 2048, 1408, "random", MIX),
    ("all_on_one_expert", 64, 2, 8, 4096, 1024, "one_expert", MIX),
    ("empty_experts", 16, 2, 16, 2048, 1024, "skip_half", MIX),
    ("topk=1", 33, 1, 8, 2048, 768, "random", MIX),
    ("topk=E", 7, 8, 8, 1024, 512, "random", MIX),
    ("non_pow2", 123, 3, 7, 1152, 416, "random", ["int4_g32_asym", "int2_g32_asym_nested3", "bf16"]),
    ("qwen3_30b_prefill", 1024, 8, 16, 2048, 768, "random", MIX),
    ("mixtral_decode", 4, 2, 8, 4096, 14336, "random", ["int4_g128_asym", "int2_g128_asym"]),
    ("olmoe_prefill", 2048, 8, 16, 2048, 1024, "random", ["int4_g128_asym", "int8_g128_sym", "int3_g128_asym"]),
    ("uniform_w4", 256, 8, 16, 2048, 768, "random", ["int4_g128_asym"]),
    ("uniform_w1_decode", 16, 8, 32, 2048, 768, "random", ["int1_g128_asym"]),
    ("qwen3_decode_T64", 64, 8, 128, 2048, 768, "random", ["int4_g128_asym", "int2_g128_asym", "int8_g128_sym"]),
]


def _experts(schemes, e, h, i, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    gu, dn = [], []
    for j in range(e):
        s = WeightScheme.parse(schemes[j % len(schemes)])
        gu.append((s, random_canonical(s, 2 * i, h, device="cuda", generator=g)))
        dn.append((s, random_canonical(s, h, i, device="cuda", generator=g)))
    return gu, dn


@pytest.mark.parametrize("case", GRID, ids=[c[0] for c in GRID])
def test_fused_moe_gpu(case):
    _, t, k, e, h, i, kind, schemes = case
    w = prepare_experts(*_experts(schemes, e, h, i), hidden=h, inter=i)
    tw, ids = make_routing(t, k, e, kind, device="cuda")
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    got = fused_moe(x, w, tw, ids)
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert got.dtype == torch.bfloat16
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


def test_fused_moe_gpu_expert_map_and_graph():
    e_local, h, i = 8, 1024, 512
    w = prepare_experts(*_experts(MIX, e_local, h, i), hidden=h, inter=i)
    tw, ids = make_routing(9, 4, 2 * e_local, "random", device="cuda")
    emap = torch.tensor([g // 2 if g % 2 == 0 else -1 for g in range(2 * e_local)], device="cuda")
    x = torch.randn(9, h, device="cuda").to(torch.bfloat16)
    want = moe_ref.fused_moe(x.float(), w, tw, ids, expert_map=emap)
    got = fused_moe(x, w, tw, ids, expert_map=emap)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]
    graph = torch.cuda.CUDAGraph()  # capturable: no host sync in routing or launch
    with torch.cuda.graph(graph):
        out = fused_moe(x, w, tw, ids, expert_map=emap)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, got, **BIT_EXACT)


@pytest.mark.parametrize("name", MIX)
@pytest.mark.parametrize("m", [1, 7, 4096])
def test_dequant_linear_gpu(name, m):
    s = WeightScheme.parse(name)
    n, k = 1536, 2048
    lw = prepare_linear(s, random_canonical(s, n, k, device="cuda", generator=torch.Generator("cuda").manual_seed(3)),
                        k=k)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    got = dequant_linear(x, lw)
    want = qref.dequant_linear(x.float(), lw)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


def test_dequant_in_kernel_bit_exact_gpu():
    for name in MIX:
        s = WeightScheme.parse(name)
        t = random_canonical(s, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
        lw = prepare_linear(s, t, k=256)
        got = dequant_linear(torch.eye(256, device="cuda"), lw)  # fp32 IEEE dot with identity = W^T exactly
        torch.testing.assert_close(got.t(), qref.dequantize(s, t, 256), **BIT_EXACT)


@pytest.mark.parametrize("t,k,e,block_m", [(1, 8, 128, 16), (16, 8, 128, 16), (64, 8, 128, 32), (128, 8, 128, 64),
                                           (7, 4, 60, 16)])
def test_moe_align_triton_equals_torch_gpu(t, k, e, block_m):
    from mxserve_kernels.moe.routing import moe_align
    tw, ids = make_routing(t, k, e, "random", device="cuda")
    a = moe_align(ids, e, block_m, use_triton=True)
    b = moe_align(ids, e, block_m, use_triton=False)
    assert torch.equal(a.num_post, b.num_post) and torch.equal(a.block_expert, b.block_expert)
    assert torch.equal(a.sorted_ids, b.sorted_ids)


def test_dequant_bf16_prefill_path_bit_exact_gpu():
    """The prefill path's dequant kernel equals the canonical oracle rounded to bf16, for every kind at once."""
    from mxserve_kernels._common.layout import dequant_expert
    from mxserve_kernels.moe.grouped_gemm import dequant_bf16
    h, i = 1024, 1408
    gu, dn = _experts(MIX, len(MIX), h, i, seed=5)
    w = prepare_experts(gu, dn, hidden=h, inter=i)
    for proj, canon, kdim in ((w.w13, gu, h), (w.w2, dn, i)):
        d = dequant_bf16(proj)
        for e, (s, t) in enumerate(canon):
            want = qref.dequantize(s, t, kdim).to(torch.bfloat16).float()
            torch.testing.assert_close(dequant_expert(d, e), want, **BIT_EXACT)


@pytest.mark.parametrize("split,fma", [(2, 0), (4, 1), (8, 0)])
def test_fused_moe_split_k_gpu(split, fma):
    """Split-K configs the tuner may pick for decode vs the reference, every kind, Qwen3 shapes (K = 2048 / 768)."""
    e, h, i = len(MIX), 2048, 768
    w = prepare_experts(*_experts(MIX, e, h, i, seed=9), hidden=h, inter=i)
    tw, ids = make_routing(3, 4, e, "random", device="cuda")
    x = torch.randn(3, h, device="cuda").to(torch.bfloat16)
    cfg = dict(BLOCK_M=1 if fma else 16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3, FMA=fma, SPLIT_K=split)
    got = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


@pytest.mark.parametrize("bm,bk,nw,split,t", [(16, 16, 4, 1, 3), (16, 32, 8, 2, 3), (32, 16, 4, 1, 40),
                                              (64, 32, 8, 1, 200)])
def test_fused_moe_ktile_gpu(bm, bk, nw, split, t):
    """KT configs (one tl.dot per 8*BLOCK_K K rows) the tuner may pick vs the reference, every kind, Qwen3 shapes."""
    e, h, i = len(MIX), 2048, 768
    w = prepare_experts(*_experts(MIX, e, h, i, seed=11), hidden=h, inter=i)
    tw, ids = make_routing(t, 4, e, "random", device="cuda")
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    cfg = dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=bk, num_warps=nw, num_stages=3, SPLIT_K=split, KT=1)
    got = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)}, prefill_dequant=False)
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


def _check_asm_layer(schemes, e, seed, bm, fma, split, t):
    """An ASM-config layer of ``schemes`` (cycled over ``e`` experts, Qwen3 shapes) vs the reference and vs the
    generic loop (same config without ASM), within the GroupGEMM tolerance."""
    h, i = 2048, 768
    w = prepare_experts(*_experts(schemes, e, h, i, seed=seed), hidden=h, inter=i)
    tw, ids = make_routing(t, 4, e, "random", device="cuda")
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    cfg = dict(BLOCK_M=bm, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3, FMA=fma, SPLIT_K=split)
    got = fused_moe(x, w, tw, ids, config={"w13": {**cfg, "ASM": 1}, "w2": {**cfg, "ASM": 1}})
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]
    generic = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
    assert rel_mean_err(generic.float(), got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


@pytest.mark.parametrize("bm,fma,split,t", [(1, 1, 1, 3), (1, 1, 2, 3), (4, 1, 1, 6), (16, 0, 1, 3), (16, 0, 2, 40)])
def test_fused_moe_asm_gpu(bm, fma, split, t):
    """ASM configs (4-bit experts dequantized with packed-bf16 PTX) vs the reference, every kind (the others take
    the generic loop in the same launch), Qwen3 shapes; and equal to the generic loop within bf16 rounding."""
    _check_asm_layer(MIX, len(MIX), 13, bm, fma, split, t)


@pytest.mark.parametrize("schemes", [["int2_g128_asym"], ["int3_g128_asym"], ["int3_g64_sym", "int2_g32_asym"],
                                     ["int2_g128_asym", "int2_g128_asym", "int2_g128_asym", "int4_g128_asym"]],
                         ids=["w2", "w3", "w3_w2_small_groups", "mix2.5"])
@pytest.mark.parametrize("bm,fma,split,t", [(1, 1, 1, 3), (16, 0, 2, 40)])
def test_fused_moe_asm2_gpu(schemes, bm, fma, split, t):
    """ASM configs on 2-bit and int3 experts (``_dq2_bf16x2`` / ``_dq3_bf16x2``: 16 slots per word, int3's high
    bit ORed in by the PTX) vs the reference and vs the generic loop, Qwen3 shapes."""
    _check_asm_layer(schemes, 8, 17, bm, fma, split, t)


@pytest.mark.parametrize("bn,nw,bk,split,asm,t", [(64, 4, 16, 1, 1, 1), (64, 4, 32, 2, 1, 3), (128, 8, 16, 1, 1, 16),
                                                  (64, 4, 16, 1, 0, 3), (128, 8, 32, 2, 0, 64)])
def test_fused_moe_swap_gpu(bn, nw, bk, split, asm, t):
    """SWAP configs (weights as wgmma's register A operand) vs the reference and vs the per-slot loop without SWAP,
    every kind in one launch (bf16 / KT-less kinds take their usual loops), Qwen3 shapes incl. E = 128 decode."""
    e, h, i = len(MIX), 2048, 768
    w = prepare_experts(*_experts(MIX, e, h, i, seed=19), hidden=h, inter=i)
    tw, ids = make_routing(t, 4, e, "random", device="cuda")
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=3, SPLIT_K=split, ASM=asm)
    got = fused_moe(x, w, tw, ids, config={"w13": {**cfg, "SWAP": 1}, "w2": {**cfg, "SWAP": 1}},
                    prefill_dequant=False)
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]
    plain = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)}, prefill_dequant=False)
    assert rel_mean_err(plain.float(), got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


@pytest.mark.parametrize("bn,nw,split,asm,t", [(64, 4, 1, 1, 4), (64, 4, 2, 1, 16), (128, 8, 1, 1, 64),
                                               (64, 4, 1, 0, 16)])
def test_fused_moe_gscale_gpu(bn, nw, split, asm, t):
    """GSCALE (int4 g128 scale/zero per group on partial sums, BLOCK_K 16) next to the per-element SWAP loop and
    the reference: uniform W4 g128 (GSCALE on) and MIX (its int4 g64 expert makes the whole int4 kind fall back:
    the mask must say so)."""
    from mxserve_kernels.moe.grouped_gemm import gscale_mask
    h, i = 2048, 768
    for names, e in ((["int4_g128_asym"], 32), (MIX, len(MIX))):
        w = prepare_experts(*_experts(names, e, h, i, seed=23), hidden=h, inter=i)
        tw, ids = make_routing(t, 4, e, "random", device="cuda")
        x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
        cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=16, num_warps=nw, num_stages=3, SPLIT_K=split, ASM=asm, SWAP=1)
        gcfg = {**cfg, "GSCALE": 1}
        want_mask = 8 if names == ["int4_g128_asym"] else 0
        assert gscale_mask(w.w13, gcfg) == want_mask and gscale_mask(w.w2, gcfg) == want_mask
        got = fused_moe(x, w, tw, ids, config={"w13": gcfg, "w2": dict(gcfg)}, prefill_dequant=False)
        want = moe_ref.fused_moe(x.float(), w, tw, ids)
        assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]
        plain = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)}, prefill_dequant=False)
        assert rel_mean_err(plain.float(), got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


def test_gscale_bit_exact_dequant_gpu():
    """x = identity in fp32 through the GSCALE loop returns W^T equal to the oracle (int4 g128 asym / sym)."""
    from mxserve_kernels.moe.grouped_gemm import gscale_mask
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3, SWAP=1, GSCALE=1)
    for name in ("int4_g128_asym", "int4_g128_sym"):
        s = WeightScheme.parse(name)
        t = random_canonical(s, 256, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
        lw = prepare_linear(s, t, k=512)
        assert gscale_mask(lw, cfg) == 8
        got = dequant_linear(torch.eye(512, device="cuda"), lw, config=cfg)
        torch.testing.assert_close(got.t(), qref.dequantize(s, t, 512), **BIT_EXACT)


def test_swap_bit_exact_dequant_gpu():
    """x = identity in fp32 (exact dot) through the SWAP loop returns W^T equal to the oracle for every kind."""
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3, SWAP=1)
    for name in MIX:
        s = WeightScheme.parse(name)
        t = random_canonical(s, 256, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(4))
        lw = prepare_linear(s, t, k=256)
        got = dequant_linear(torch.eye(256, device="cuda"), lw, config=cfg)
        torch.testing.assert_close(got.t(), qref.dequantize(s, t, 256), **BIT_EXACT)


def test_swap_decode_qwen3_e128_gpu():
    """The tuner's target shape: E = 128, top-8, T = 16, W4 with SWAP + ASM, BLOCK_N 64 and 128."""
    e, h, i = 128, 2048, 768
    w = prepare_experts(*_experts(["int4_g128_asym", "int2_g128_asym"], e, h, i, seed=23), hidden=h, inter=i)
    tw, ids = make_routing(16, 8, e, "random", device="cuda")
    x = torch.randn(16, h, device="cuda").to(torch.bfloat16)
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    for bn, nw in ((64, 4), (128, 8)):
        cfg = dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=16, num_warps=nw, num_stages=3, ASM=1, SWAP=1)
        got = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
        assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


@pytest.mark.parametrize("block_m", [1, 2, 4, 8])
def test_fused_moe_fma_config_gpu(block_m):
    """The FMA K loop the tuner may pick for decode (BLOCK_M < 16) vs the reference, every kind, Qwen3 shapes."""
    e, h, i = len(MIX), 2048, 768
    w = prepare_experts(*_experts(MIX, e, h, i, seed=7), hidden=h, inter=i)
    tw, ids = make_routing(6, 4, e, "random", device="cuda")
    x = torch.randn(6, h, device="cuda").to(torch.bfloat16)
    cfg = dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3, FMA=1)
    got = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)})
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


def test_prefill_path_graph_capturable_gpu():
    """The prefill dequant path (>= PREFILL_DEQUANT_ROWS rows per expert) has no host sync: CUDA-graph capture works
    and replays to the eager result (vLLM captures batch sizes where Mixtral-like E=8, K=2 layers take this path)."""
    from mxserve_kernels.moe.fused_moe import PREFILL_DEQUANT_ROWS
    e, k, h, i = 8, 2, 1024, 512
    t = PREFILL_DEQUANT_ROWS * e // k + 8
    w = prepare_experts(*_experts(["int4_g128_asym", "int2_g128_asym", "bf16"], e, h, i, seed=9), hidden=h, inter=i)
    tw, ids = make_routing(t, k, e, "random", device="cuda")
    x = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    eager = fused_moe(x, w, tw, ids)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w, tw, ids)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, **BIT_EXACT)
    want = moe_ref.fused_moe(x.float(), w, tw, ids)
    assert rel_mean_err(want, eager.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]
