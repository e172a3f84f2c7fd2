"""GPU tier: the Triton canonical-format launchers (``quant.pack``) vs the oracle (``quant.reference``, run on the same
GPU), bit-exact on real model shapes; dequantize-to-bf16 bandwidth is recorded into $MXSERVE_TEST_JSON.

Run: ``MXSERVE_TEST_JSON=$OUT/pack_gpu.json python -m pytest -q -m gpu tests/kernels/test_pack_gpu.py``
"""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import NESTED_BASE_BITS, WeightScheme
from mxserve_kernels.quant import dequantize, pack_codes, unpack_codes
from mxserve_kernels.quant import reference as qref
from tests.helpers.results import record_result

# (case, N, K): one projection of a real model ([out_features, in_features])
SHAPES = [("qwen3_30b_gate_up", 1536, 2048), ("qwen3_30b_down", 2048, 768), ("mixtral_down", 4096, 14336),
          ("odd_rows_non_pow2_k", 123, 384)]
SCHEMES = ["int1_g128_asym", "int2_g128_asym", "int3_g128_asym", "int3_g32_sym_fp16", "int4_g128_asym",
           "int4_g64_sym_fp16", "int8_g128_sym", "int8_g32_asym", "int2_g128_asym_nested2", "int2_g128_asym_nested3",
           "int2_g32_asym_fp16_nested4"]


def _fits(s: WeightScheme, k: int) -> bool:
    return k % s.group_size == 0


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("case,n,k", SHAPES, ids=[c[0] for c in SHAPES])
def test_pack_unpack_gpu_bit_exact(case, n, k, bits):
    g = torch.Generator(device="cuda").manual_seed(n + k + bits)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, device="cuda", dtype=torch.int64)
    got = pack_codes(codes, bits)
    assert got.is_cuda and torch.equal(got, qref.pack_codes(codes, bits))
    assert torch.equal(unpack_codes(got, bits, k), codes.to(torch.uint8))
    raw = torch.randint(0, 256, (n, k * bits // 8), generator=g, device="cuda", dtype=torch.int64).to(torch.uint8)
    assert torch.equal(unpack_codes(raw, bits, k), qref.unpack_codes(raw, bits, k))


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("case,n,k", SHAPES, ids=[c[0] for c in SHAPES])
def test_dequantize_gpu_bit_exact(case, n, k, name):
    s = WeightScheme.parse(name)
    if not _fits(s, k):
        pytest.skip(f"G={s.group_size} does not divide K={k}")
    t = random_canonical(s, n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(n + k))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        got = dequantize(s, t, k, dt)
        want = qref.dequantize(s, t, k, dt)
        assert got.dtype == dt and torch.equal(got, want), dt


@pytest.mark.parametrize("name", ["int4_g128_asym", "int2_g128_asym", "int3_g128_asym", "int2_g128_asym_nested4"])
def test_dequantize_bandwidth(name):
    """Records GB/s (bytes read + bf16 bytes written) of dequantize-to-bf16 on the Mixtral down projection."""
    s = WeightScheme.parse(name)
    n, k = 4096, 14336
    t = random_canonical(s, n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    nplanes = s.bits - NESTED_BASE_BITS if s.nested else 0
    used = [x for key, x in t.items() if not key.startswith("plane") or int(key[5]) <= NESTED_BASE_BITS + nplanes]
    nbytes = sum(x.numel() * x.element_size() for x in used) + n * k * 2
    for _ in range(3):
        dequantize(s, t, k, torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        dequantize(s, t, k, torch.bfloat16)
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1e3 / reps
    record_result(f"pack_gpu.dequant_bf16.{name}.{n}x{k}", {"us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1)})
    assert us > 0
