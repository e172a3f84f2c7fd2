"""RTN primitives: canonical tensors dequantize (via the reference oracle) to exactly what the quantizer assumed."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.formats import WeightScheme, tensor_names
from mxserve_kernels.quant.reference import dequantize
from mxserve.quant.primitives import pack, quantize_rtn, rtn_tensors
from tests.tolerances import BIT_EXACT, SQNR_DB_MIN, sqnr_db

SCHEMES = [WeightScheme(b, g, sym, sd) for b in (2, 3, 4, 8) for g in (32, 128) for sym in (False, True)
           for sd in ("bf16", "fp16")]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_rtn_pack_roundtrip_bit_exact(scheme):
    w = torch.randn(24, 256)
    codes, params, dq = quantize_rtn(w, scheme)
    t = pack(scheme, codes, params)
    assert set(t) == set(tensor_names(scheme))
    torch.testing.assert_close(dequantize(scheme, t, 256), dq, **BIT_EXACT)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_sqnr_floor(bits):
    w = torch.randn(64, 512)
    s = WeightScheme(bits, 128)
    assert sqnr_db(w, quantize_rtn(w, s)[2]) >= SQNR_DB_MIN[bits]


def test_symmetric_never_uses_most_negative_code():
    w = torch.randn(16, 128)
    codes, _, _ = quantize_rtn(w, WeightScheme(4, 32, symmetric=True))
    assert int(codes.min()) >= 1 and int(codes.max()) <= 15


def test_constant_group_is_exact_asymmetric():
    w = torch.full((4, 128), 0.375)  # representable in bf16: the float zero point holds it exactly
    for s in (WeightScheme(2, 128), WeightScheme(4, 64, scale_dtype="fp16")):
        torch.testing.assert_close(quantize_rtn(w, s)[2], w, **BIT_EXACT)


def test_clip_search_never_worse_than_minmax():
    w = torch.randn(32, 256)
    w[0, 0] = 12.0  # an outlier that min-max wastes levels on
    s = WeightScheme(3, 128)
    plain = sqnr_db(w, quantize_rtn(w, s)[2])
    clipped = sqnr_db(w, quantize_rtn(w, s, clip_search=True)[2])
    assert clipped >= plain


def test_group_size_not_dividing_k_names_the_weight():
    with pytest.raises(ValueError, match="group size 128 does not divide"):
        quantize_rtn(torch.randn(8, 96), WeightScheme(4, 128))


def test_bf16_passthrough():
    w = torch.randn(8, 64)
    t = rtn_tensors(w, WeightScheme(16))
    assert set(t) == {"weight"} and t["weight"].dtype == torch.bfloat16
