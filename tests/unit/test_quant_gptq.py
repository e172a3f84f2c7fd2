"""GPTQ solver: beats RTN on correlated inputs, batched == per-expert, canonical tensors are exact."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant.reference import dequantize
from mxserve.quant.gptq.solver import accumulate_hessian, make_empty_hessian, quantize_weight
from mxserve.quant.primitives import pack, quantize_rtn
from tests.tolerances import BIT_EXACT, GEMM, GPTQ_GAIN_DB_3BIT, sqnr_db


def correlated_inputs(t: int, k: int, seed: int = 0) -> torch.Tensor:
    """[T, K] activations with strongly correlated channels and a few high-energy ones (like LLM hiddens)."""
    g = torch.Generator().manual_seed(1234)  # the distribution (mixing, loud channels) is fixed...
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    loud = 1 + 4 * (torch.rand(k, generator=g) < 0.05)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(seed))  # ...the samples vary with seed
    return (x @ (torch.eye(k) + 2.0 * mix)) * loud


def out_sqnr(w, wq, x):
    return sqnr_db(x @ w.t(), x @ wq.t())


def hessian(x):
    h = make_empty_hessian(x.shape[1])
    n = accumulate_hessian(h, 0, x[: len(x) // 2])
    accumulate_hessian(h, n, x[len(x) // 2:])
    return h


def test_running_hessian_equals_batch_formula():
    x = torch.randn(100, 32)
    torch.testing.assert_close(hessian(x), 2.0 / 100 * x.t() @ x, **GEMM[torch.float32])


@pytest.mark.parametrize("act_order,static", [(True, True), (False, False), (False, True)])
def test_gptq_beats_rtn_by_2db_at_3_bits(act_order, static):
    k, n = 256, 128
    x = correlated_inputs(2048, k)
    w = torch.randn(n, k) * 0.05
    s = WeightScheme(3, 128)
    h = hessian(x)
    _, _, dq_g = quantize_weight(w, h, s, act_order=act_order, static_groups=static)
    dq_r = quantize_rtn(w, s)[2]
    xt = correlated_inputs(512, k, seed=1)  # held-out activations from the same distribution
    assert out_sqnr(w, dq_g, xt) >= out_sqnr(w, dq_r, xt) + GPTQ_GAIN_DB_3BIT


@pytest.mark.parametrize("scheme", [WeightScheme(4, 64), WeightScheme(3, 32, symmetric=True),
                                    WeightScheme(2, 128, scale_dtype="fp16")], ids=lambda s: s.name)
def test_gptq_tensors_dequantize_exactly(scheme):
    x = correlated_inputs(512, 128)
    w = torch.randn(16, 128)
    codes, params, dq = quantize_weight(w, hessian(x), scheme, clip_search=True)
    torch.testing.assert_close(dequantize(scheme, pack(scheme, codes, params), 128), dq.float(), **BIT_EXACT)


def test_batched_equals_single():
    s = WeightScheme(4, 32)
    ws = torch.randn(3, 8, 64)
    hs = torch.stack([hessian(correlated_inputs(256, 64, seed=i)) for i in range(3)])
    codes_b, _, dq_b = quantize_weight(ws, hs, s)
    for i in range(3):
        codes_1, _, dq_1 = quantize_weight(ws[i], hs[i], s)
        torch.testing.assert_close(codes_b[i], codes_1, **BIT_EXACT)
        torch.testing.assert_close(dq_b[i], dq_1, **GEMM[torch.float32])


def test_zero_hessian_falls_back_to_rtn():
    s = WeightScheme(4, 64)
    w = torch.randn(8, 128)
    codes, _, _ = quantize_weight(w, torch.zeros(128, 128), s, act_order=False, static_groups=True)
    torch.testing.assert_close(codes, quantize_rtn(w, s)[0], **BIT_EXACT)


def test_act_order_without_static_groups_refused():
    with pytest.raises(ValueError, match="static_groups"):
        quantize_weight(torch.randn(8, 64), torch.eye(64), WeightScheme(4, 32), act_order=True, static_groups=False)
