"""The SWAP K loop (config ``"SWAP": 1``: ``acc^T += W_slot x^T``, weights as the dot's A operand) under the Triton
CPU interpreter, tiny shapes: every kind (int1/2/3/4/8, nested planes, bf16 in the same launch), gate_up and down,
split-K, K not a multiple of the step, BLOCK_N 64 (the sm90 wgmma shape) and 32. The interpreter cannot run inline
PTX, so the ASM dequant is off here (``IS_FP32``); ``test_kernels_asm_ptx.py`` emulates its PTX and the GPU tier runs
both together.

Triton reads ``TRITON_INTERPRET`` when it is imported, so ``test_swap_under_interpreter`` re-runs this file in a
subprocess with the variable set; the other tests skip in the parent process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.tolerances import GROUPED_GEMM_REL_MEAN, rel_mean_err
from tests.unit._kernel_cases import make_experts, make_routing

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERP, reason="runs in the subprocess of test_swap_under_interpreter")

# every kind: planes (int3, nested 1 and 2 planes: the parity sub-steps), 1-bit (runtime slot loop), 8-bit, bf16
SCHEMES = ["int2_g32_asym", "int3_g64_sym", "int4_g32_asym", "int8_g32_sym_fp16", "bf16", "int2_g32_asym_nested3",
           "int2_g32_asym_nested4", "int1_g32_asym", "int3_g32_asym"]


def test_swap_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "not under_interpreter"], env=env, capture_output=True, text=True, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def _cfg(block_n: int, block_k: int, split: int = 1, swap: int = 1) -> dict:
    return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=2, SPLIT_K=split, SWAP=swap)


@needs_interp
@pytest.mark.parametrize("block_n,block_k,split,h,i", [(64, 16, 1, 64, 64), (32, 32, 2, 128, 64),
                                                       (64, 16, 1, 192, 64)])
def test_fused_moe_swap_every_kind(block_n, block_k, split, h, i):
    """SWAP vs the fp32 reference for every kind in one launch; fp16 activations (tensor-core-like rounding) and
    fp32 activations (exact dot: same sum as the reference up to fp32 order). h = 192 against 128- or 256-row steps
    leaves a masked tail; split 2 gives each program a K range starting at a nonzero word row."""
    from mxserve_kernels.moe import fused_moe, prepare_experts
    from mxserve_kernels.moe import reference as moe_ref
    w = prepare_experts(*make_experts(SCHEMES, hidden=h, inter=i), hidden=h, inter=i)
    tw, ids = make_routing(5, 3, len(SCHEMES), "random")
    x = torch.randn(5, h)
    cfg = _cfg(block_n, block_k, split)
    want = moe_ref.fused_moe(x, w, tw, ids)
    got16 = fused_moe(x.to(torch.float16), w, tw, ids, config={"w13": cfg, "w2": dict(cfg)}, prefill_dequant=False)
    assert rel_mean_err(moe_ref.fused_moe(x.to(torch.float16).float(), w, tw, ids), got16.float()) \
        < GROUPED_GEMM_REL_MEAN[torch.float16]
    got32 = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)}, prefill_dequant=False)
    assert rel_mean_err(want, got32) < GROUPED_GEMM_REL_MEAN[torch.float32]


@needs_interp
@pytest.mark.parametrize("name", ["int3_g32_asym", "int2_g64_asym_nested4", "int4_g128_asym"])
def test_dequant_linear_swap_bit_exact(name):
    """x = identity (fp32, exact dot): the SWAP loop outputs its dequantized W^T, equal to the canonical oracle
    bit for bit -- catches a wrong plane half (parity sub-steps), slot order or K row of the transposed tiles."""
    from mxserve_kernels._common.synth import random_canonical
    from mxserve_kernels.formats import WeightScheme
    from mxserve_kernels.quant import dequant_linear, prepare_linear
    from mxserve_kernels.quant import reference as qref
    s = WeightScheme.parse(name)
    t = random_canonical(s, 64, 256, generator=torch.Generator().manual_seed(5))
    lw = prepare_linear(s, t, k=256)
    got = dequant_linear(torch.eye(256), lw, config=_cfg(64, 16))
    assert torch.equal(got.t(), qref.dequantize(s, t, 256))


@needs_interp
def test_swap_differs_from_a_wrong_parity():
    """Teeth for the check above: the int3 oracle differs from the same codes with the high-bit plane halves
    swapped between even and odd word rows (what a wrong parity offset would produce)."""
    from mxserve_kernels._common.synth import random_canonical
    from mxserve_kernels.formats import WeightScheme
    from mxserve_kernels.quant import reference as qref
    s = WeightScheme.parse("int3_g32_asym")
    t = random_canonical(s, 64, 256, generator=torch.Generator().manual_seed(5))
    codes = qref.unpack_codes(t["qweight"], 3, 256).long()
    hi = codes >> 2
    swapped = (codes & 3) | (hi.reshape(64, -1, 2, 16).flip(2).reshape(64, 256) << 2)
    t_bad = dict(t, qweight=qref.pack_codes(swapped.to(torch.uint8), 3))
    assert not torch.equal(qref.dequantize(s, t, 256), qref.dequantize(s, t_bad, 256))


def test_cfg_list_carries_swap():
    """The launch config reaches the kernel: SWAP is the 10th entry of the op's config list (also the warm-up key)."""
    from mxserve_kernels.moe.grouped_gemm import _cfg_list
    base = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3)
    assert _cfg_list(base)[9] == 0 and _cfg_list({**base, "SWAP": 1})[9] == 1


# GSCALE (config "GSCALE": 1 with SWAP): scale/zero applied per group to partial sums for plain int4 experts whose
# group covers whole steps (BLOCK_K 16: 128-row steps, so g128); int4 g64 and every other kind keep the per-element
# loop in the same launch.
GS_SCHEMES = ["int4_g128_asym", "int4_g128_sym", "int4_g64_asym", "int2_g128_asym", "int3_g64_sym",
              "int8_g32_sym_fp16", "bf16", "int2_g32_asym_nested3", "int1_g32_asym"]


@needs_interp
@pytest.mark.parametrize("split,h", [(2, 512)])
def test_fused_moe_gscale_every_kind(split, h):
    """GSCALE on, every kind in one launch, fp32 activations (exact dot) vs the fp32 reference within the
    GROUPED_GEMM tolerance, and fp16 activations vs the reference on the same fp16-rounded input. split 2 gives
    programs K ranges starting at row 256 (a step and group boundary)."""
    from mxserve_kernels.moe import fused_moe, prepare_experts
    from mxserve_kernels.moe import reference as moe_ref
    from mxserve_kernels.moe.grouped_gemm import gscale_mask
    i = 256
    w = prepare_experts(*make_experts(GS_SCHEMES, hidden=h, inter=i), hidden=h, inter=i)
    cfg = dict(_cfg(64, 16, split), GSCALE=1)
    assert gscale_mask(w.w13, cfg) == 0  # int4 g64 present: the int4 kind falls back
    w = prepare_experts(*make_experts([s for s in GS_SCHEMES if s != "int4_g64_asym"], hidden=h, inter=i),
                        hidden=h, inter=i)
    assert gscale_mask(w.w13, cfg) == 8 and gscale_mask(w.w2, cfg) == 8
    tw, ids = make_routing(5, 3, w.num_experts, "random")
    x = torch.randn(5, h)
    got32 = fused_moe(x, w, tw, ids, config={"w13": cfg, "w2": dict(cfg)}, prefill_dequant=False)
    assert rel_mean_err(moe_ref.fused_moe(x, w, tw, ids), got32) < GROUPED_GEMM_REL_MEAN[torch.float32]
    got16 = fused_moe(x.to(torch.float16), w, tw, ids, config={"w13": cfg, "w2": dict(cfg)}, prefill_dequant=False)
    assert rel_mean_err(moe_ref.fused_moe(x.to(torch.float16).float(), w, tw, ids), got16.float()) \
        < GROUPED_GEMM_REL_MEAN[torch.float16]


@needs_interp
@pytest.mark.parametrize("name", ["int4_g128_asym", "int4_g128_sym"])
def test_dequant_linear_gscale_bit_exact(name):
    """x = identity (fp32): the GSCALE loop's output is ``s * q + z`` per weight (part = q, xsum = 1), equal to the
    canonical oracle bit for bit -- catches a wrong group row, zero correction, xsum or K order. The launcher must
    have enabled GSCALE (else this would test the per-element loop)."""
    from mxserve_kernels._common.synth import random_canonical
    from mxserve_kernels.formats import WeightScheme
    from mxserve_kernels.moe.grouped_gemm import gscale_mask
    from mxserve_kernels.quant import dequant_linear, prepare_linear
    from mxserve_kernels.quant import reference as qref
    s = WeightScheme.parse(name)
    k = 640
    t = random_canonical(s, 64, k, generator=torch.Generator().manual_seed(7))
    lw = prepare_linear(s, t, k=k)
    cfg = dict(_cfg(64, 16), GSCALE=1)
    assert gscale_mask(lw, cfg) == 8
    got = dequant_linear(torch.eye(k), lw, config=cfg)
    assert torch.equal(got.t(), qref.dequantize(s, t, k))


def test_gscale_mask_checks_group_against_step():
    """The launcher enables GSCALE only where the step lies inside one group: 4-bit steps of 128 (BLOCK_K 16) /
    256 rows (BLOCK_K 32) against g, split-K starts, only with SWAP (not KT), never for other kinds (2-bit steps
    are >= 256 rows)."""
    from mxserve_kernels._common.synth import random_canonical
    from mxserve_kernels.formats import WeightScheme
    from mxserve_kernels.moe.grouped_gemm import _cfg_list, gscale_mask, gscale_step_rows
    from mxserve_kernels.quant import prepare_linear
    assert [gscale_step_rows(4, 16), gscale_step_rows(4, 32), gscale_step_rows(2, 16), gscale_step_rows(2, 64)] \
        == [128, 256, 256, 512]

    def mask(name, k=512, **cfg):
        s = WeightScheme.parse(name)
        lw = prepare_linear(s, random_canonical(s, 64, k, generator=torch.Generator().manual_seed(1)), k=k)
        return gscale_mask(lw, {**_cfg(64, 16), "GSCALE": 1, **cfg})
    assert mask("int4_g128_asym") == 8 and mask("int4_g128_asym", BLOCK_K=32) == 0
    assert mask("int4_g64_asym") == 0 and mask("int2_g128_asym") == 0
    assert mask("int4_g128_asym", k=384, SPLIT_K=2) == 0  # k_split 192: the second range starts mid-step
    assert mask("int4_g128_asym", k=512, SPLIT_K=2) == 8
    assert mask("int4_g128_asym", SWAP=0) == 0 and mask("int4_g128_asym", KT=1) == 0
    assert mask("int3_g128_asym") == 0 and mask("int8_g128_sym") == 0
    base = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3, SWAP=1)
    assert _cfg_list(base)[10] == 0 and _cfg_list({**base, "GSCALE": 1})[10] == 8
