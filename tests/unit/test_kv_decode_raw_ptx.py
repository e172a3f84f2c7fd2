"""The packed PTX of the raw-code KV decode unpack (``decode_kernels._raw_asm``) executed by a small emulator of the
instructions it uses, on CPU: every output of a 16-bit half-word (bytes b0, b1 of a slot's codes) must be the
``1 + c / 2^CB`` bf16 / fp16 value of the sub-code the portable path (``_raw_tile`` without ASM, run by the
interpreter tests) puts in that column, bit-exactly. The GPU test (``tests/kernels/test_attention_kv.py``, path
"raw_asm") runs the real thing; this one guards shifts, masks, the /3 multiply-shift and the output order in CI,
where inline PTX cannot run."""
from __future__ import annotations

import re

import pytest
import torch

from mxserve_kernels.attention.decode_kernels import _raw_asm

M32 = 0xFFFFFFFF
CASES = [(2, False), (4, False), (1.5, False), (2, True), (4, True), (1.5, True)]  # (bits, fp16 outputs)


def _imm(tok: str, reg: dict) -> int:
    return int(tok, 16) if tok.startswith("0x") else (int(tok) if tok.lstrip("-").isdigit() else reg[tok])


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        n = (sel >> (4 * i)) & 0xF
        byte = src[n & 7]
        if n & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(src: str, half: int, n_out: int) -> list[int]:
    """Execute the unpack PTX for one half-word; returns the 16-bit outputs $0 .. $(n_out - 1)."""
    reg: dict[str, int] = {f"${n_out}": half}
    for line in (ln.strip().rstrip(";") for ln in src.splitlines()):
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in re.split(r",(?![^{]*})", args)]
        v = lambda t: _imm(t, reg)
        if op == "mov.b32" and a[1].startswith("{"):  # pack two 16-bit halves
            lo, hi = (x.strip() for x in a[1].strip("{}").split(","))
            reg[a[0]] = (reg[hi] << 16) | reg[lo]
        elif op == "mov.b32" and a[0].startswith("{"):  # unpack into two halves
            lo, hi = (x.strip() for x in a[0].strip("{}").split(","))
            reg[lo], reg[hi] = reg[a[1]] & 0xFFFF, reg[a[1]] >> 16
        elif op == "mov.b32":
            reg[a[0]] = v(a[1])
        elif op == "prmt.b32":
            reg[a[0]] = _prmt(v(a[1]), v(a[2]), v(a[3]))
        elif op == "shl.b32":
            reg[a[0]] = (v(a[1]) << int(a[2])) & M32
        elif op == "shr.u32":
            reg[a[0]] = v(a[1]) >> int(a[2])
        elif op == "and.b32":
            reg[a[0]] = v(a[1]) & v(a[2])
        elif op == "lop3.b32":
            assert a[4] == "0xea", "emulator knows (a & b) | c only"
            reg[a[0]] = (v(a[1]) & v(a[2])) | v(a[3])
        elif op == "mul.lo.u32":
            reg[a[0]] = (v(a[1]) * v(a[2])) & M32
        elif op == "mad.lo.u32":
            reg[a[0]] = (v(a[1]) * v(a[2]) + v(a[3])) & M32
        else:
            raise AssertionError(f"unknown instruction {line!r}")
    return [reg[f"${i}"] for i in range(n_out)]


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
        assert run_ptx(src, h, n_out) == expected(h, bits, f16), (bits, f16, hex(h))


def test_raw_unpack_ternary_all_bytes():
    """Every valid ternary byte in both lanes (the /3 multiply-shift is exact on 0..242 without lane carries)."""
    src = _raw_asm(1.5, False)
    for x in range(243):
        h = x | ((242 - x) << 8)
        assert run_ptx(src, h, 10) == expected(h, 1.5, False), x


def test_emulator_catches_wrong_order_and_magic():
    """The checks above have teeth: a swapped output pair, a wrong /3 constant, or a wrong 1.0 are detected."""
    h = 0x1B2D  # distinct codes in every slot of both bytes
    good = _raw_asm(2, False)
    assert run_ptx(good, h, 8) == expected(h, 2, False)
    swapped = good.replace("mov.b32 {$0, $4}, t;", "mov.b32 {$4, $0}, t;")
    assert run_ptx(swapped, h, 8) != expected(h, 2, False)
    tern = _raw_asm(1.5, False)
    bad_div = tern.replace("mul.lo.u32 r, q, 171;", "mul.lo.u32 r, q, 170;")
    assert any(run_ptx(bad_div, x | (x << 8), 10) != expected(x | (x << 8), 1.5, False) for x in range(243))
    bad_one = _raw_asm(4, False).replace("0x3f803f80", "0x3f003f00")
    assert run_ptx(bad_one, h, 4) != expected(h, 4, False)
