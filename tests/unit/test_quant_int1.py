"""int1 asym (MxMoE w1, 1.25 bits at g128): 2-means levels, exact canonical tensors, GPTQ gain, allocator default."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant.reference import dequantize
from mxserve.quant.api import candidate_schemes, uniform_baseline
from mxserve.quant.gptq.solver import quantize_weight
from mxserve.quant.primitives import GroupParams, fake_quantize, pack, quantize_rtn, two_level_params
from tests.tolerances import BIT_EXACT, SQNR_DB_MIN_1BIT, sqnr_db
from tests.unit.test_quant_gptq import correlated_inputs, hessian, out_sqnr

INT1 = WeightScheme(1, 128)


@pytest.mark.parametrize("scheme", [WeightScheme(1, 128), WeightScheme(1, 32, scale_dtype="fp16")],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("clip", [False, True])
def test_int1_rtn_tensors_dequantize_exactly(scheme, clip):
    w = torch.randn(24, 256)
    codes, params, dq = quantize_rtn(w, scheme, clip_search=clip)
    assert int(codes.max()) <= 1
    t = pack(scheme, codes, params)
    assert t["qweight"].shape == (24, 256 // 8)
    torch.testing.assert_close(dequantize(scheme, t, 256), dq, **BIT_EXACT)


def test_two_means_beats_min_max_and_meets_floor():
    w = torch.randn(64, 512)
    dq = quantize_rtn(w, INT1)[2]
    g = w.reshape(64, 4, 128)
    lo, hi = g.amin(-1), g.amax(-1)
    minmax = fake_quantize(w, GroupParams((hi - lo).bfloat16().float(), lo.bfloat16().float()), INT1)[1]
    assert sqnr_db(w, dq) >= SQNR_DB_MIN_1BIT
    assert sqnr_db(w, dq) > sqnr_db(w, minmax)


def test_two_means_levels_are_conditional_means():
    """Fixed point of Lloyd: each level is the mean of the values on its side of the midpoint."""
    w = torch.randn(4, 128, dtype=torch.float64).float()
    p = two_level_params(w, WeightScheme(1, 128, scale_dtype="fp16"))
    lo, hi = p.zeros[:, 0], p.zeros[:, 0] + p.scales[:, 0]
    for r in range(4):
        above = w[r] > (lo[r] + hi[r]) / 2
        torch.testing.assert_close(hi[r], w[r][above].mean(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lo[r], w[r][~above].mean(), atol=2e-3, rtol=2e-3)


def test_clip_search_never_worse_at_one_bit():
    w = torch.randn(32, 256)
    w[0, :4] = 9.0
    assert sqnr_db(w, quantize_rtn(w, INT1, clip_search=True)[2]) >= sqnr_db(w, quantize_rtn(w, INT1)[2])


@pytest.mark.parametrize("clip", [False, True])
def test_int1_gptq_exact_tensors_and_beats_rtn(clip):
    k, n = 256, 64
    x = correlated_inputs(2048, k)
    w = torch.randn(n, k) * 0.05
    codes, params, dq = quantize_weight(w, hessian(x), INT1, clip_search=clip)
    torch.testing.assert_close(dequantize(INT1, pack(INT1, codes, params), k), dq.float(), **BIT_EXACT)
    xt = correlated_inputs(512, k, seed=1)
    assert out_sqnr(w, dq, xt) > out_sqnr(w, quantize_rtn(w, INT1)[2], xt)


def test_default_candidates_include_int1_and_uniform_is_the_issue_baseline():
    cands = candidate_schemes(128, nested=False)
    names = [c.name for c in cands]
    assert names[0] == "int1_g128_asym" and cands[0].bits_per_weight == 1.25
    assert uniform_baseline(cands, 2.25, 128).name == "int2_g128_asym"
    assert uniform_baseline(cands, 3.25, 128).name == "int3_g128_asym"
    assert uniform_baseline(cands, 2.2, 128).name == "int1_g128_asym"   # nothing above the budget, ever
