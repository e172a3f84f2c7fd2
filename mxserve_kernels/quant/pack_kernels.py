"""Triton kernels for the canonical bit stream of ``formats.py`` (launchers in ``quant/pack.py``).

Every kernel works on one row (program axis 0) and a block of K (or of packed bytes) per program (axis 1). Stream bit
``i`` of a row is bit ``i % 8`` of byte ``i // 8``; code ``k`` occupies stream bits ``[k*BITS, (k+1)*BITS)``, so a
3-bit code may straddle two bytes: kernels gather bit by bit (``BITS`` or 8 unrolled steps), which is bit-exact for
any width 1..8 without special cases. Dequantization is the reference expression in fp32: ``q * scale`` is exact
(q < 2**8, 16-bit scale), so an FMA-contracted ``q * scale + zero`` rounds exactly like the reference.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _gather_codes(row_ptr, offs_k, mask, BITS: tl.constexpr):
    """Codes ``offs_k`` (int32, [BLOCK_N, BLOCK] tile) of packed uint8 rows starting at ``row_ptr``."""
    code = tl.zeros(offs_k.shape, dtype=tl.int32)
    for b in tl.static_range(BITS):
        s = offs_k * BITS + b
        byte = tl.load(row_ptr + s // 8, mask=mask, other=0).to(tl.int32)
        code = code | (((byte >> (s % 8)) & 1) << b)
    return code


@triton.jit
def _bf16_rtne_bits(x):
    """fp32 -> bf16 bit pattern (int16), round to nearest even; NaN -> canonical quiet NaN."""
    xi = x.to(tl.uint32, bitcast=True)
    r = (xi + 0x7FFF + ((xi >> 16) & 1)) >> 16
    r = tl.where((xi & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _tile(n_rows, n_cols, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    """Row ids (int64 [BLOCK_N, 1]), column ids (int32 [1, BLOCK]) and in-bounds mask of this program's tile."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    return rows, cols, (rows < n_rows) & (cols < n_cols)


@triton.jit
def pack_kernel(codes_ptr, out_ptr, n, k, nbytes, stride_c, stride_o, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK: tl.constexpr):
    """codes [N, K] (any int dtype, unit column stride) -> out uint8 [N, K*BITS/8];
    grid (cdiv(N, BLOCK_N), cdiv(nbytes, BLOCK))."""
    rows, offs, mask = _tile(n, nbytes, BLOCK_N, BLOCK)
    acc = tl.zeros((BLOCK_N, BLOCK), dtype=tl.int32)
    for i in tl.static_range(8):
        s = offs * 8 + i
        code = tl.load(codes_ptr + rows * stride_c + s // BITS, mask=mask, other=0).to(tl.int32)
        acc = acc | (((code >> (s % BITS)) & 1) << i)
    tl.store(out_ptr + rows * stride_o + offs, acc.to(tl.uint8), mask=mask)


@triton.jit
def unpack_kernel(packed_ptr, out_ptr, n, k, stride_p, stride_o, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK: tl.constexpr):
    """packed uint8 [N, K*BITS/8] -> codes uint8 [N, K]; grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK))."""
    rows, offs, mask = _tile(n, k, BLOCK_N, BLOCK)
    code = _gather_codes(packed_ptr + rows * stride_p, offs, mask, BITS)
    tl.store(out_ptr + rows * stride_o + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def dequant_kernel(out_ptr, qw_ptr, sc_ptr, zr_ptr, p3w_ptr, p3s_ptr, p4w_ptr, p4s_ptr, n, k,
                   stride_o, stride_q, stride_s, stride_p,
                   BITS: tl.constexpr, G: tl.constexpr, SYMMETRIC: tl.constexpr, NPLANES: tl.constexpr,
                   ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    """One [N, K] weight -> out [N, K] (out's dtype); grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK)).

    ROUND_BF16: ``out`` is a bf16 tensor viewed as int16; the fp32 result is rounded to nearest-even by integer
    ops (the interpreter's fp32 -> bf16 cast truncates; this matches torch's ``.to(bfloat16)`` everywhere).

    ``qw`` uint8 [N, K*BITS/8]; ``sc``/``zr`` [N, K/G] (row stride ``stride_s``; ``zr`` unused if SYMMETRIC);
    NPLANES (0..2) nested sign planes ``p3w``/``p4w`` uint8 [N, K/8] (row stride ``stride_p``) with scales
    ``p3s``/``p4s`` [N, K/G]. Order of operations = ``reference.dequantize`` (bit-exact).
    """
    rows, offs, mask = _tile(n, k, BLOCK_N, BLOCK)
    q = _gather_codes(qw_ptr + rows * stride_q, offs, mask, BITS).to(tl.float32)
    srow = rows * stride_s + offs // G
    scale = tl.load(sc_ptr + srow, mask=mask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        w = (q - float(1 << (BITS - 1))) * scale
    else:
        w = q * scale + tl.load(zr_ptr + srow, mask=mask, other=0.0).to(tl.float32)
    if NPLANES >= 1:
        sign = _gather_codes(p3w_ptr + rows * stride_p, offs, mask, 1).to(tl.float32) * 2.0 - 1.0
        w = w + sign * tl.load(p3s_ptr + srow, mask=mask, other=0.0).to(tl.float32)
    if NPLANES >= 2:
        sign = _gather_codes(p4w_ptr + rows * stride_p, offs, mask, 1).to(tl.float32) * 2.0 - 1.0
        w = w + sign * tl.load(p4s_ptr + srow, mask=mask, other=0.0).to(tl.float32)
    if ROUND_BF16:
        tl.store(out_ptr + rows * stride_o + offs, _bf16_rtne_bits(w), mask=mask)
    else:
        tl.store(out_ptr + rows * stride_o + offs, w.to(out_ptr.dtype.element_ty), mask=mask)
