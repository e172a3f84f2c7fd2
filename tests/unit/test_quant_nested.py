"""Nested MWQ weights: every prefix dequantizes on its own; the 4-bit prefix is as good as int4 RTN."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.formats import WeightScheme, tensor_names
from mxserve_kernels.quant.reference import dequantize
from mxserve.quant.nested import quantize_nested
from mxserve.quant.primitives import quantize_rtn
from tests.tolerances import BIT_EXACT, NESTED4_VS_INT4_DB, SQNR_DB_MIN, sqnr_db


@pytest.mark.parametrize("g", [32, 128])
def test_each_prefix_dequantizes_on_its_own(g):
    w = torch.randn(16, 256)
    full = WeightScheme(4, g, nested=True)
    t, deq = quantize_nested(w, full)
    assert set(t) == set(tensor_names(full))
    for p in (2, 3, 4):
        s = WeightScheme(p, g, nested=True)
        # a prefix only needs the base + planes <= p
        needed = {k: v for k, v in t.items() if not k.startswith("plane") or int(k[5]) <= p}
        torch.testing.assert_close(dequantize(s, needed, 256), deq[p], **BIT_EXACT)


def test_prefix_quality_monotone_and_4bit_close_to_int4_rtn():
    w = torch.randn(128, 1024)
    _, deq = quantize_nested(w, WeightScheme(4, 128, nested=True))
    q = [sqnr_db(w, deq[p]) for p in (2, 3, 4)]
    assert q[0] < q[1] < q[2]
    assert q[0] >= SQNR_DB_MIN[2] and q[1] >= SQNR_DB_MIN[3]
    int4 = sqnr_db(w, quantize_rtn(w, WeightScheme(4, 128))[2])
    assert q[2] >= int4 - NESTED4_VS_INT4_DB


def test_nested_rejects_plain_scheme():
    with pytest.raises(ValueError, match="not nested"):
        quantize_nested(torch.randn(4, 128), WeightScheme(4, 128))
