"""The packed-bf16 PTX of the ASM dequant (``grouped_gemm_kernels._dq_asm`` for 4-bit, 2-bit and int3 words)
executed by a small emulator of the instructions it uses, on CPU: every code slot of a word must come out as
``bf16(q * bf16(s) + bf16(z))`` in slot order (slot j = K row ``PER*w + j``; int3: ``q = lo | hi << 2`` with the
2-bit plane word and the high-bit word, bit j = slot j). The GPU tests ``test_fused_moe_asm_gpu`` /
``test_fused_moe_asm2_gpu`` run the real thing; this one guards the masks, magic numbers and output order in CI,
where inline PTX cannot run."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.moe.grouped_gemm_kernels import _dq4_asm, _dq_asm
from tests.unit._ptx_emulator import bf16_bits as _bf16_bits
from tests.unit._ptx_emulator import bf16_val as _bf16_val
from tests.unit._ptx_emulator import run_ptx


def _random_sz(g: torch.Generator) -> tuple[int, int]:
    s = float(torch.rand(1, generator=g).item()) * 0.02 + 1e-4
    z = -float(torch.rand(1, generator=g).item()) * 8 * s
    return _bf16_bits(s), _bf16_bits(z)


@pytest.mark.parametrize("seed", range(4))
def test_asm_dequant_ptx_slots_and_values(seed):
    g = torch.Generator().manual_seed(seed)
    src = _dq4_asm()
    for _ in range(64):
        codes = torch.randint(0, 16, (8,), generator=g).tolist()
        word = sum(q << (4 * j) for j, q in enumerate(codes))
        sb, zb = _random_sz(g)
        got = run_ptx(src, [word, sb, zb], 8)
        want = [_bf16_bits(q * _bf16_val(sb) + _bf16_val(zb)) for q in codes]
        assert got == want, (codes, [_bf16_val(b) for b in got], [_bf16_val(b) for b in want])


@pytest.mark.parametrize("seed", range(4))
def test_asm2_dequant_ptx_slots_and_values(seed):
    """2-bit: 16 slots per word, slot j in bits [2j, 2j+2)."""
    g = torch.Generator().manual_seed(100 + seed)
    src = _dq_asm(2)
    for _ in range(64):
        codes = torch.randint(0, 4, (16,), generator=g).tolist()
        word = sum(q << (2 * j) for j, q in enumerate(codes))
        sb, zb = _random_sz(g)
        got = run_ptx(src, [word, sb, zb], 16)
        assert got == [_bf16_bits(q * _bf16_val(sb) + _bf16_val(zb)) for q in codes], codes


@pytest.mark.parametrize("seed", range(4))
def test_asm3_dequant_ptx_slots_and_values(seed):
    """int3: the 2-bit plane word + the high-bit word (bit j = slot j; bits 16..31 are the other word row's and
    must be ignored, so they are random here)."""
    g = torch.Generator().manual_seed(200 + seed)
    src = _dq_asm(3)
    for _ in range(64):
        codes = torch.randint(0, 8, (16,), generator=g).tolist()
        word = sum((q & 3) << (2 * j) for j, q in enumerate(codes))
        hi = sum((q >> 2) << j for j, q in enumerate(codes)) | (int(torch.randint(0, 1 << 16, (1,), generator=g)) << 16)
        sb, zb = _random_sz(g)
        got = run_ptx(src, [word, hi, sb, zb], 16)
        assert got == [_bf16_bits(q * _bf16_val(sb) + _bf16_val(zb)) for q in codes], codes


@pytest.mark.parametrize("bits", [4, 2, 3])
def test_emulator_catches_a_wrong_slot_order(bits):
    """The checks above have teeth: swapping two output slots in the PTX is detected (for int3 also: dropping the
    high-bit OR of one pair)."""
    per = 8 if bits == 4 else 16
    half = per // 2
    bad = _dq_asm(bits).replace(f"mov.b32 {{$0, ${half}}}, t;", f"mov.b32 {{${half}, $0}}, t;")
    assert bad != _dq_asm(bits)
    one, zero = _bf16_bits(1.0), _bf16_bits(0.0)
    if bits == 4:
        ins = [sum(j << (4 * j) for j in range(8)), one, zero]
        want = [float(j) for j in range(8)]
    else:  # slots 0 and 8 differ; int3: the high bit is set in slot 1 (the pair whose OR is dropped below)
        codes = [0, 1, 2, 3, 0, 1, 2, 3, 1, 2, 3, 0, 1, 2, 3, 0] if bits == 2 else \
            [7, 6, 5, 4, 3, 2, 1, 0, 0, 5, 6, 7, 1, 2, 3, 4]
        ins = [sum((q & 3) << (2 * j) for j, q in enumerate(codes))] + \
            ([sum((q >> 2) << j for j, q in enumerate(codes))] if bits == 3 else []) + [one, zero]
        want = [float(q) for q in codes]
    assert [_bf16_val(b) for b in run_ptx(_dq_asm(bits), ins, per)] == want
    assert [_bf16_val(b) for b in run_ptx(bad, ins, per)] != want
    if bits == 3:
        no_hi = _dq_asm(3).replace("lop3.b32 t, u, 0x00040004, t, 0xea;", "", 1)
        assert [_bf16_val(b) for b in run_ptx(no_hi, ins, per)] != want


def test_dq_asm_rejects_other_widths():
    with pytest.raises(ValueError, match="bits must be 2, 3 or 4"):
        _dq_asm(8)


@pytest.mark.parametrize("bits", [4, 2])
def test_gscale_codes_ptx_slots(bits):
    """GSCALE's code split (``_codes_asm``): every slot j of a word comes out as the exact bf16 ``128 + code`` in
    slot order; negative control: two swapped output slots are detected."""
    from mxserve_kernels.moe.grouped_gemm_kernels import _codes_asm
    per = 32 // bits
    g = torch.Generator().manual_seed(300 + bits)
    src = _codes_asm(bits)
    for _ in range(64):
        codes = torch.randint(0, 1 << bits, (per,), generator=g).tolist()
        word = sum(q << (bits * j) for j, q in enumerate(codes))
        assert [_bf16_val(b) for b in run_ptx(src, [word], per)] == [128.0 + q for q in codes], codes
    bad = src.replace(f"mov.b32 {{$0, ${per // 2}}}, t;", f"mov.b32 {{${per // 2}, $0}}, t;")
    assert bad != src
    codes = [1] * (per // 2) + [2] * (per // 2)  # slots 0 and PER/2 differ
    word = sum(q << (bits * j) for j, q in enumerate(codes))
    assert [_bf16_val(b) for b in run_ptx(bad, [word], per)] != [128.0 + q for q in codes]
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        _codes_asm(3)
