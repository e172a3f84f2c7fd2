"""The packed PTX of the raw-code KV decode unpack (``decode_kernels._raw_asm``) executed by a small emulator of the
instructions it uses, on CPU: every output of a 16-bit half-word (bytes b0, b1 of a slot's codes) must be the
``1 + c / 2^CB`` bf16 / fp16 value of the sub-code the portable path (``_raw_tile`` without ASM, run by the
interpreter tests) puts in that column, bit-exactly. The GPU test (``tests/kernels/test_attention_kv.py``, path
"raw_asm") runs the real thing; this one guards shifts, masks, the /3 multiply-shift and the output order in CI,
where inline PTX cannot run."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.attention.decode_kernels import _raw_asm
from tests.unit._ptx_emulator import run_ptx as _run

CASES = [(2, False), (4, False), (1.5, False), (2, True), (4, True), (1.5, True)]  # (bits, fp16 outputs)


def _run_half(src: str, half: int, n_out: int) -> list[int]:
    """The unpack PTX on one 16-bit half-word (operand ``$n_out``)."""
    return _run(src, [half], n_out)


def _bits(x: float, f16: bool) -> int:
    dt = torch.float16 if f16 else torch.bfloat16
    return int(torch.tensor([x], dtype=torch.float32).to(dt).view(torch.int16).item()) & 0xFFFF


def expected(half: int, bits: float, f16: bool) -> list[int]:
    """Outputs the portable path produces: main column k = byte k // PM, sub-code k % PM; ternary $8/$9 = digit 4
    of b0/b1; each as 1 + c / 2^CB."""
    b = [half & 0xFF, half >> 8]
    cb = 4 if bits == 4 else 2
    if bits == 1.5:
        codes = [(b[k // 4] // 3 ** (k % 4)) % 3 for k in range(8)] + [b[0] // 81, b[1] // 81]
    else:
        pm = 8 // int(bits)
        codes = [(b[k // pm] >> (int(bits) * (k % pm))) & ((1 << int(bits)) - 1) for k in range(2 * pm)]
    return [_bits(1 + c / 2 ** cb, f16) for c in codes]


def _halves(bits: float, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    hi = 243 if bits == 1.5 else 256  # ternary bytes are t0 + 3 t1 + ... + 81 t4 <= 242
    edge = [0, (hi - 1) | ((hi - 1) << 8), hi - 1, (hi - 1) << 8, 0x0102, 0x0201]
    rnd = torch.randint(0, hi, (n, 2), generator=g).tolist()
    return edge + [lo | (up << 8) for lo, up in rnd]


@pytest.mark.parametrize("bits,f16", CASES, ids=[f"{b}-{'f16' if f else 'bf16'}" for b, f in CASES])
def test_raw_unpack_ptx_bit_exact(bits, f16):
    src = _raw_asm(bits, f16)
    n_out = 10 if bits == 1.5 else (8 if bits == 2 else 4)
    for h in _halves(bits, 300, seed=int(bits * 10) + f16):
        assert _run_half(src, h, n_out) == expected(h, bits, f16), (bits, f16, hex(h))


def test_raw_unpack_ternary_all_bytes():
    """Every valid ternary byte in both lanes (the /3 multiply-shift is exact on 0..242 without lane carries)."""
    src = _raw_asm(1.5, False)
    for x in range(243):
        h = x | ((242 - x) << 8)
        assert _run_half(src, h, 10) == expected(h, 1.5, False), x


def test_emulator_catches_wrong_order_and_magic():
    """The checks above have teeth: a swapped output pair, a wrong /3 constant, or a wrong 1.0 are detected."""
    h = 0x1B2D  # distinct codes in every slot of both bytes
    good = _raw_asm(2, False)
    assert _run_half(good, h, 8) == expected(h, 2, False)
    swapped = good.replace("mov.b32 {$0, $4}, t;", "mov.b32 {$4, $0}, t;")
    assert _run_half(swapped, h, 8) != expected(h, 2, False)
    tern = _raw_asm(1.5, False)
    bad_div = tern.replace("mul.lo.u32 r, q, 171;", "mul.lo.u32 r, q, 170;")
    assert any(_run_half(bad_div, x | (x << 8), 10) != expected(x | (x << 8), 1.5, False) for x in range(243))
    bad_one = _raw_asm(4, False).replace("0x3f803f80", "0x3f003f00")
    assert _run_half(bad_one, h, 4) != expected(h, 4, False)
