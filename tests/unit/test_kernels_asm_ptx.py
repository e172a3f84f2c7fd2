"""The packed-bf16 PTX of the ASM dequant (``grouped_gemm_kernels._dq4_asm``) executed by a small emulator of the
five instructions it uses, on CPU: every 4-bit code slot of a word must come out as ``bf16(q * bf16(s) + bf16(z))``
in slot order (slot j = K row ``8*w + j``). The GPU test ``test_fused_moe_asm_gpu`` runs the real thing; this one
guards the masks, magic numbers and output order in CI, where inline PTX cannot run."""
from __future__ import annotations

import re

import pytest
import torch

from mxserve_kernels.moe.grouped_gemm_kernels import _dq4_asm


def _bf16_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _bf16_val(bits: int) -> float:
    return float(torch.tensor([bits if bits < 0x8000 else bits - 0x10000], dtype=torch.int16)
                 .view(torch.bfloat16).float().item())


def _fma_bf16(a: int, b: int, c: int) -> int:
    """One lane of fma.rn.bf16x2: a*b+c exact in fp64 (bf16 inputs), one rounding to bf16 (via fp32: exact here)."""
    return _bf16_bits(_bf16_val(a) * _bf16_val(b) + _bf16_val(c))


def run_ptx(src: str, word: int, s_bits: int, z_bits: int) -> list[int]:
    """Execute the dequant PTX for one word; returns the 16-bit outputs $0..$7."""
    reg: dict[str, int] = {"$8": word, "$9": s_bits, "$10": z_bits}
    val = lambda t: int(t, 16) if t.startswith("0x") else reg[t]  # noqa: E731
    for line in (ln.strip().rstrip(";") for ln in src.splitlines()):
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in re.split(r",(?![^{]*})", args)]
        if op == "mov.b32" and a[1].startswith("{"):    # pack two halves
            lo, hi = (x.strip() for x in a[1].strip("{}").split(","))
            reg[a[0]] = (reg[hi] << 16) | reg[lo]
        elif op == "mov.b32" and a[0].startswith("{"):  # unpack into two halves
            lo, hi = (x.strip() for x in a[0].strip("{}").split(","))
            reg[lo], reg[hi] = reg[a[1]] & 0xFFFF, reg[a[1]] >> 16
        elif op == "mov.b32":
            reg[a[0]] = val(a[1])
        elif op == "lop3.b32":
            assert a[4] == "0xea", "emulator knows (a & b) | c only"
            reg[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "shr.u32":
            reg[a[0]] = val(a[1]) >> int(a[2])
        elif op == "fma.rn.bf16x2":
            x, y, z = val(a[1]), val(a[2]), val(a[3])
            lanes = [_fma_bf16((x >> k) & 0xFFFF, (y >> k) & 0xFFFF, (z >> k) & 0xFFFF) for k in (0, 16)]
            reg[a[0]] = (lanes[1] << 16) | lanes[0]
        else:
            raise AssertionError(f"unknown instruction {line!r}")
    return [reg[f"${i}"] for i in range(8)]


@pytest.mark.parametrize("seed", range(4))
def test_asm_dequant_ptx_slots_and_values(seed):
    g = torch.Generator().manual_seed(seed)
    src = _dq4_asm()
    for _ in range(64):
        codes = torch.randint(0, 16, (8,), generator=g).tolist()
        word = sum(q << (4 * j) for j, q in enumerate(codes))
        s = float(torch.rand(1, generator=g).item()) * 0.02 + 1e-4
        z = -float(torch.rand(1, generator=g).item()) * 8 * s
        sb, zb = _bf16_bits(s), _bf16_bits(z)
        got = run_ptx(src, word, sb, zb)
        want = [_bf16_bits(q * _bf16_val(sb) + _bf16_val(zb)) for q in codes]
        assert got == want, (codes, [_bf16_val(b) for b in got], [_bf16_val(b) for b in want])


def test_emulator_catches_a_wrong_slot_order():
    """The check above has teeth: swapping two output slots in the PTX is detected."""
    bad = _dq4_asm().replace("mov.b32 {$0, $4}, t;", "mov.b32 {$4, $0}, t;")
    word = sum(j << (4 * j) for j in range(8))  # slot j holds code j
    one, zero = _bf16_bits(1.0), _bf16_bits(0.0)
    assert [_bf16_val(b) for b in run_ptx(_dq4_asm(), word, one, zero)] == [float(j) for j in range(8)]
    assert [_bf16_val(b) for b in run_ptx(bad, word, one, zero)] != [float(j) for j in range(8)]
