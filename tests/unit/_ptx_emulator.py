"""A tiny CPU emulator of the inline PTX our Triton kernels emit through ``tl.inline_asm_elementwise`` (the MoE
dequant ``grouped_gemm_kernels._dq_asm`` and the KV decode unpack ``decode_kernels._raw_asm``), so CI can check
their masks, magic numbers, shifts and output order bit-exactly where inline PTX cannot run. Only the instructions
those builders use are known; anything else is an assertion error (a new instruction must be taught here)."""
from __future__ import annotations

import re

import torch

M32 = 0xFFFFFFFF


def bf16_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def bf16_val(bits: int) -> float:
    return float(torch.tensor([bits if bits < 0x8000 else bits - 0x10000], dtype=torch.int16)
                 .view(torch.bfloat16).float().item())


def _fma_bf16(a: int, b: int, c: int) -> int:
    """One lane of fma.rn.bf16x2: a*b+c exact in fp64 (bf16 inputs), one rounding to bf16 (via fp32: exact here)."""
    return bf16_bits(bf16_val(a) * bf16_val(b) + bf16_val(c))


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


def run_ptx(src: str, inputs: list[int], n_out: int) -> list[int]:
    """Execute a PTX body; ``inputs`` are operands ``$n_out, $n_out+1, ...``; returns the 16-bit outputs
    ``$0 .. $(n_out-1)``."""
    reg: dict[str, int] = {f"${n_out + i}": v for i, v in enumerate(inputs)}

    def v(t: str) -> int:
        return int(t, 16) if t.startswith("0x") else (int(t) if t.lstrip("-").isdigit() else reg[t])

    for line in (ln.strip().rstrip(";") for ln in src.splitlines()):
        if line in ("{", "}", "") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in re.split(r",(?![^{]*})", args)]
        if op == "mov.b32" and a[1].startswith("{"):    # pack two 16-bit halves
            lo, hi = (x.strip() for x in a[1].strip("{}").split(","))
            reg[a[0]] = (reg[hi] << 16) | reg[lo]
        elif op == "mov.b32" and a[0].startswith("{"):  # unpack into two halves
            lo, hi = (x.strip() for x in a[0].strip("{}").split(","))
            reg[lo], reg[hi] = reg[a[1]] & 0xFFFF, reg[a[1]] >> 16
        elif op == "mov.b32":
            reg[a[0]] = v(a[1])
        elif op == "lop3.b32":
            assert a[4] == "0xea", "emulator knows (a & b) | c only"
            reg[a[0]] = (v(a[1]) & v(a[2])) | v(a[3])
        elif op == "prmt.b32":
            reg[a[0]] = _prmt(v(a[1]), v(a[2]), v(a[3]))
        elif op == "shr.u32":
            reg[a[0]] = v(a[1]) >> int(a[2])
        elif op == "shl.b32":
            reg[a[0]] = (v(a[1]) << int(a[2])) & M32
        elif op == "and.b32":
            reg[a[0]] = v(a[1]) & v(a[2])
        elif op == "mul.lo.u32":
            reg[a[0]] = (v(a[1]) * v(a[2])) & M32
        elif op == "mad.lo.u32":
            reg[a[0]] = (v(a[1]) * v(a[2]) + v(a[3])) & M32
        elif op == "fma.rn.bf16x2":
            x, y, z = v(a[1]), v(a[2]), v(a[3])
            lanes = [_fma_bf16((x >> k) & 0xFFFF, (y >> k) & 0xFFFF, (z >> k) & 0xFFFF) for k in (0, 16)]
            reg[a[0]] = (lanes[1] << 16) | lanes[0]
        else:
            raise AssertionError(f"unknown instruction {line!r}")
    return [reg[f"${i}"] for i in range(n_out)]
