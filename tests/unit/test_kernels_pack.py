"""Canonical-format Triton launchers (``quant.pack``) vs the oracle (``quant.reference``), bit-exact.

In the main (CPU) session: input checks and the CPU fallback. The Triton kernels themselves run under
TRITON_INTERPRET=1 in a subprocess on this same file (Triton reads the variable when ``triton.language`` is first
imported); the kernel tests are only defined in that subprocess, the subprocess launcher only outside it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant import dequantize, pack_codes, unpack_codes
from mxserve_kernels.quant import reference as qref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROWS = (1, 3, 16)
KS = (8, 24, 128, 256)
SCHEMES = ["int1_g32_asym", "int1_g128_asym_fp16", "int2_g32_asym", "int2_g64_sym", "int3_g32_asym",
           "int3_g64_sym", "int3_g128_asym_fp16", "int4_g32_asym", "int4_g128_sym", "int4_g64_sym_fp16",
           "int8_g32_sym_fp16", "int8_g64_asym", "int2_g32_asym_nested2", "int2_g32_asym_nested3",
           "int2_g64_asym_nested4", "int2_g128_asym_fp16_nested3", "bf16"]
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _codes(n, k, bits, dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n, k), generator=g).to(dtype)


# ---- main session: checks and CPU fallback (no Triton) ------------------------------------------------------------
def test_pack_errors_name_the_tensor():
    with pytest.raises(ValueError, match="pack_codes: codes must be a 2-D"):
        pack_codes(torch.zeros(8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="pack_codes: codes must be an integer"):
        pack_codes(torch.zeros(2, 8), 2)
    with pytest.raises(ValueError, match="pack_codes: bits"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match="whole number of bytes"):
        pack_codes(torch.zeros(2, 5, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.full((2, 8), 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"unpack_codes: expected uint8 \[N, 3\]"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.uint8), 3, 8)


def test_dequantize_errors_name_the_tensor():
    s = WeightScheme.parse("int2_g32_asym_nested4")
    good = random_canonical(s, 4, 64, generator=torch.Generator().manual_seed(0))
    for name, bad, pattern in [("zeros", None, r"tensors\['zeros'\] is missing"),
                               ("scales", good["scales"][:, :1], r"tensors\['scales'\] must be float \[4, 2\]"),
                               ("plane4_weight", good["plane4_weight"].to(torch.int32),
                                r"tensors\['plane4_weight'\] must be torch.uint8"),
                               ("qweight", good["qweight"][0], r"tensors\['qweight'\] must be a 2-D")]:
        t = dict(good)
        if bad is None:
            del t[name]
        else:
            t[name] = bad
        with pytest.raises(ValueError, match=pattern):
            dequantize(s, t, 64)
    with pytest.raises(ValueError, match="group size 32 does not divide"):
        dequantize(s, good, 48)
    with pytest.raises(ValueError, match="out_dtype"):
        dequantize(s, good, 64, torch.int32)


@pytest.mark.skipif(INTERPRET, reason="CPU fallback only without the interpreter")
def test_cpu_fallback_is_the_reference():
    c = _codes(3, 24, 3)
    assert torch.equal(pack_codes(c, 3), qref.pack_codes(c, 3))
    assert torch.equal(unpack_codes(qref.pack_codes(c, 3), 3, 24), c.to(torch.uint8))
    s = WeightScheme.parse("int3_g32_asym")
    t = random_canonical(s, 3, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dequantize(s, t, 64, torch.bfloat16), qref.dequantize(s, t, 64, torch.bfloat16))


@pytest.mark.skipif(INTERPRET, reason="this is the launcher of the interpreter run")
def test_triton_pack_kernels_under_interpreter():
    """The Triton kernels on CPU: this file in a subprocess with TRITON_INTERPRET=1 (tiny shapes, < 40 s)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "interp_",
                           os.path.abspath(__file__)], check=False, env=env, capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout and " failed" not in proc.stdout


# ---- subprocess only: the Triton kernels under TRITON_INTERPRET=1 -------------------------------------------------
if INTERPRET:
    from mxserve_kernels.quant import pack as qpack

    def test_interp_launchers_use_triton():
        assert qpack._use_triton(torch.zeros(1))  # otherwise everything below would only test the reference

    @pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
    def test_interp_pack_unpack_bit_exact(bits):
        for n in ROWS:
            for k in KS:
                dtype = (torch.int64, torch.uint8, torch.int32)[(n + k) % 3]
                c = _codes(n, k, bits, dtype, seed=n * 1000 + k)
                got = pack_codes(c, bits)
                want = qref.pack_codes(c, bits)
                assert got.dtype == torch.uint8 and torch.equal(got, want), (n, k, dtype)
                assert torch.equal(unpack_codes(got, bits, k), qref.unpack_codes(want, bits, k)), (n, k)
                assert torch.equal(unpack_codes(got, bits, k), c.to(torch.uint8)), (n, k)

    @pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
    def test_interp_unpack_random_bytes_and_strided_codes(bits):
        """Every byte pattern (3-bit codes straddling bytes included) and non-contiguous codes."""
        k = 256
        g = torch.Generator().manual_seed(bits)
        packed = torch.randint(0, 256, (16, k * bits // 8), generator=g).to(torch.uint8)
        assert torch.equal(unpack_codes(packed, bits, k), qref.unpack_codes(packed, bits, k))
        wide = _codes(3, 2 * k, bits)
        strided = wide[:, ::2]
        assert torch.equal(pack_codes(strided, bits), qref.pack_codes(strided, bits))
        assert torch.equal(pack_codes(wide.t().contiguous().t(), bits), qref.pack_codes(wide, bits))

    @pytest.mark.parametrize("name", SCHEMES)
    def test_interp_dequantize_bit_exact(name):
        s = WeightScheme.parse(name)
        for n, k in [(1, 128), (3, 256), (16, 128)]:
            t = random_canonical(s, n, k, generator=torch.Generator().manual_seed(n + k))
            for dt in OUT_DTYPES:
                got = dequantize(s, t, k, dt)
                want = qref.dequantize(s, t, k, dt)
                assert got.dtype == dt and got.shape == (n, k) and torch.equal(got, want), (n, k, dt)

    def test_interp_dequantize_bf16_round_half_even():
        """q*1 + 256 hits exact bf16 ties (257 -> 256, 259 -> 260): rounding must be nearest-even, not truncation."""
        s = WeightScheme.parse("int4_g32_asym")
        codes = torch.arange(16).repeat(2, 2)  # [2, 32]
        t = {"qweight": qref.pack_codes(codes, 4), "scales": torch.ones(2, 1, dtype=torch.bfloat16),
             "zeros": torch.full((2, 1), 256.0, dtype=torch.bfloat16)}
        got = dequantize(s, t, 32, torch.bfloat16)
        want = qref.dequantize(s, t, 32, torch.bfloat16)
        assert torch.equal(got, want)
        assert got[0, 3].item() == 260.0 and got[0, 1].item() == 256.0
