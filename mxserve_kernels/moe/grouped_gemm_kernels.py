"""@triton.jit kernels of the mixed-precision grouped GEMM (runtime layout: ``_common/layout.py``).

One launch covers every expert of a projection whatever its scheme: each program owns one (m-block, n-block) tile,
reads its expert's ``einfo`` row and branches once, outside the K loop, to a K loop specialised (constexpr) for
that kind (bf16, int1/2/4/8, int3 = 2-bit plane + high-bit plane, nested int2 + 1..2 sign planes).

Integer K loop (v1, no register reshapes): each iteration loads a ``[BLOCK_K, BLOCK_N]`` tile of int32 code words
(word row ``kw`` holds K rows ``kw*PER .. kw*PER+PER-1``, PER = 32/B) once, then for each code slot ``j < PER``
extracts the ``[BLOCK_K, BLOCK_N]`` codes of K rows ``kw*PER + j`` with one shift+mask, dequantizes them
(``q * scale + zero`` in fp32, the reference's expression; scale row ``kw*PER // G`` is the same for every j since
PER divides G) and feeds ``tl.dot`` with the matching strided activation columns. So codes are read once, unpacking
is one shift per element, and there is no reshape / layout shuffle of weight tiles in registers.

Modes (constexpr ``MODE``): 0 plain ``out[r] = x[r // a_div] @ W^T``; 1 gate_up with fused SiLU-and-mul
(``out[r] = silu(x W_gate^T) * (x W_up^T)``, gate rows ``[0, n_up)``, up rows ``[n_up, 2 n_up)``);
2 down with the router weight ``out[r] = topk_w[r] * (x[r] @ W^T)``.

Config: BLOCK_K is the K extent of one ``tl.dot`` (code words per iteration for integer kinds, i.e. BLOCK_K*PER K
rows per iteration; bf16 experts step 2*BLOCK_K rows per iteration).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, w, acc, IS_FP32: tl.constexpr):
    if IS_FP32:  # fp32 activations, or the CPU interpreter (whose bf16 tl.dot is wrong): exact fp32 dot
        return tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, w.to(a.dtype), acc)


@triton.jit
def _code_f32(q):
    """Exact fp32 value of small non-negative int32 codes (q < 2^23) without the I2F conversion (a quarter-rate
    pipe on sm90): OR the code into the mantissa of 2^23 (0x4B000000), reinterpret, subtract 2^23 (exact)."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _dq(words, s, z, p0, sp0, p1, sp1, psh, J, KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr):
    """fp32 weights of code slot J: ``q * s + z`` (+ high bit for int3, + signed planes for nested)."""
    q = (words >> (J * BITS)) & ((1 << BITS) - 1)
    if KIND == 3:
        q = q | (((p0 >> (psh + J)) & 1) << 2)
    w = _code_f32(q) * s + z
    if KIND == 4:  # sign +-1 as (2*bit - 1), exact; arithmetic, not a select: keeps the SWAP dequant in registers
        w = w + sp0 * (_code_f32(((p0 >> (psh + J)) & 1) * 2) - 1.0)
        if NP == 2:
            w = w + sp1 * (_code_f32(((p1 >> (psh + J)) & 1) * 2) - 1.0)
    return w


@triton.jit
def _load_tile(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi, w0, col, n_mask,
               KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr, BLOCK_K: tl.constexpr,
               SWAP: tl.constexpr = False, WST: tl.constexpr = 1):
    """Code words, scale, zero (+ planes and plane scales) of word rows ``w0 + WST*i``, i < BLOCK_K (masked from word row
    ``kw_hi`` on: the end of this program's K range; K is the full reduction length, for the metadata layout).
    ``pm`` = (plane-scale offset, words between planes, plane-scale elements between planes): einfo PMOFF, PWSTEP,
    PMSTEP (plane scales need not follow scale/zero: the offload slot pool keeps them in another slot).
    Tiles are ``[BLOCK_K, BN]`` with ``col`` ``[1, BN]``; SWAP: ``[BN, BLOCK_K]`` with ``col`` ``[BN, 1]`` (loaded in
    that orientation, not transposed: a ``tl.trans`` would stop the compiler from building the weight tile in the
    dot-operand layout from the load, see ``_int_loop``)."""
    PER: tl.constexpr = 32 // BITS
    wr = w0 + tl.arange(0, BLOCK_K) * WST
    kr = wr * PER
    kg = K // g
    if SWAP:
        m2 = (wr < kw_hi)[None, :] & n_mask[:, None]
        gi = (kr // g)[None, :]
        pr = (kr // 32)[None, :]
        wr = wr[None, :]
    else:
        m2 = (wr < kw_hi)[:, None] & n_mask[None, :]
        gi = (kr // g)[:, None]
        pr = (kr // 32)[:, None]
        wr = wr[:, None]
    words = tl.load(qw_ptr + qoff + wr * wcols + col, mask=m2, other=0)
    s = tl.load(meta_ptr + moff + gi * wcols + col, mask=m2, other=0.0).to(tl.float32)
    z = tl.load(meta_ptr + moff + (kg + gi) * wcols + col, mask=m2, other=0.0).to(tl.float32)
    p0 = 0
    p1 = 0
    sp0 = 0.0
    sp1 = 0.0
    if KIND >= 3:
        p0 = tl.load(pw_ptr + poff + pr * wcols + col, mask=m2, other=0)
        if NP == 2:
            p1 = tl.load(pw_ptr + poff + pm[1] + pr * wcols + col, mask=m2, other=0)
    if KIND == 4:
        sp0 = tl.load(meta_ptr + pm[0] + gi * wcols + col, mask=m2, other=0.0).to(tl.float32)
        if NP == 2:
            sp1 = tl.load(meta_ptr + pm[0] + pm[2] + gi * wcols + col, mask=m2, other=0.0).to(tl.float32)
    return words, s, z, p0, sp0, p1, sp1


@triton.jit
def _load_tiles(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi, w0, col, col2, n_mask,
                KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr, BLOCK_K: tl.constexpr, DUAL: tl.constexpr,
                SWAP: tl.constexpr = False, WST: tl.constexpr = 1):
    """``_load_tile`` at columns ``col`` and, for the fused gate_up (DUAL), at ``col2`` (the up half); without DUAL
    the second 7-tuple repeats the first (unused)."""
    words, s, z, p0, sp0, p1, sp1 = _load_tile(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi,
                                               w0, col, n_mask, KIND, BITS, NP, BLOCK_K, SWAP, WST)
    words2, s2, z2, q0, tp0, q1, tp1 = words, s, z, p0, sp0, p1, sp1
    if DUAL:
        words2, s2, z2, q0, tp0, q1, tp1 = _load_tile(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K,
                                                      kw_hi, w0, col2, n_mask, KIND, BITS, NP, BLOCK_K, SWAP, WST)
    return words, s, z, p0, sp0, p1, sp1, words2, s2, z2, q0, tp0, q1, tp1


_BF16_HEAD = ["mov.b32 one, 0x3f803f80;", "mov.b32 m128, 0xc300c300;"]  # 1.0 and -128.0 bf16 pairs


def _pair_tail(lo: int, hi: int) -> list[str]:
    """``t`` holds two ``128 + code`` bf16 lanes: exact codes (fma by 1, -128), then ``code * scale + zero``
    (one rounding), unpacked into outputs ``$lo`` (low lane) and ``$hi``."""
    return ["fma.rn.bf16x2 t, t, one, m128;", "fma.rn.bf16x2 t, t, ss, zz;", f"mov.b32 {{${lo}, ${hi}}}, t;"]


def _dq_asm(bits: int) -> str:
    """PTX body of the packed-bf16 dequant of one 32-bit code word of ``bits`` = 4, 2 or 3 (3: the 2-bit plane word
    plus the high-bit word). Operands: outputs ``$0 .. $(PER-1)`` = code slots (bf16; PER = 8 for 4-bit, 16 for
    2/3-bit), then the word, (3-bit: the high-bit word, bit j = slot j), scale, zero (bf16). Slots i and i + PER/2
    share the 16-bit halves of ``word >> (bits_lo * i)``, so one ``lop3`` masks both into the mantissas of a 128.0
    bf16 pair (``(x & mask) | 0x43004300``: 128 + code, exact for code < 128)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"_dq_asm: bits must be 2, 3 or 4, got {bits}")
    blo = 4 if bits == 4 else 2  # bits per code in the word
    per = 32 // blo
    w, ops = f"${per}", per + (2 if bits == 3 else 1)
    mask = "0x000f000f" if bits == 4 else "0x00030003"
    lines = ["{", ".reg .b32 t, c, ss, zz, one, m128, hs, u;", f"mov.b32 ss, {{${ops}, ${ops}}};",
             f"mov.b32 zz, {{${ops + 1}, ${ops + 1}}};"] + _BF16_HEAD
    if bits == 3:  # spread the high bits: slot j < 8 to bit j + 2, slot j + 8 to bit j + 18 (bit 2 of each half)
        h = f"${per + 1}"
        lines += [f"shl.b32 u, {h}, 10;", "lop3.b32 u, u, 0x03fc0000, 0x00000000, 0xea;", f"shl.b32 hs, {h}, 2;",
                  "lop3.b32 hs, hs, 0x000003fc, u, 0xea;"]
    for i in range(per // 2):
        src = w if i == 0 else "c"
        if i:
            lines.append(f"shr.u32 c, {w}, {blo * i};")
        lines.append(f"lop3.b32 t, {src}, {mask}, 0x43004300, 0xea;")
        if bits == 3:  # OR the two high bits (slots i, i + 8) into bit 2 of each half
            if i:
                lines.append(f"shr.u32 u, hs, {i};")
            lines.append(f"lop3.b32 t, {'hs' if i == 0 else 'u'}, 0x00040004, t, 0xea;")
        lines += _pair_tail(i, i + per // 2)
    return "\n".join(lines + ["}"])


def _dq4_asm() -> str:
    """PTX body of ``_dq4_bf16x2``: operands $0..$7 = slots 0..7 (bf16), $8 = the word, $9 / $10 = scale / zero."""
    return _dq_asm(4)


_DQ4_ASM = tl.constexpr(_dq_asm(4))
_DQ2_ASM = tl.constexpr(_dq_asm(2))
_DQ3_ASM = tl.constexpr(_dq_asm(3))
_BF16X8 = tl.constexpr((tl.bfloat16,) * 8)
_BF16X16 = tl.constexpr((tl.bfloat16,) * 16)


@triton.jit
def _dq4_bf16x2(words, s, z):
    """The 8 code slots of 4-bit words as 8 bf16 tensors (slot j = K row ``kw*8 + j``) in packed-bf16 PTX: per word
    4 x (shift, ``lop3`` the nibbles of slots j and j+4 into the mantissas of 128.0 bf16 pairs, ``fma.bf16x2`` by
    1 and -128 (exact: the codes), ``fma.bf16x2`` by scale and zero) = ~12 instructions per 8 weights instead of ~6
    per weight. Scale and zero are rounded to bf16 (the weight itself is rounded to bf16 for the dot anyway)."""
    return tl.inline_asm_elementwise(
        asm=_DQ4_ASM, constraints="=h," * 8 + "r,h,h", args=[words, s.to(tl.bfloat16), z.to(tl.bfloat16)],
        dtype=_BF16X8, is_pure=True, pack=1)


@triton.jit
def _dq2_bf16x2(words, s, z):
    """``_dq4_bf16x2`` for 2-bit words: 16 bf16 tensors (slot j = K row ``kw*16 + j``), 8 x (shift, lop3 mask
    0x00030003, 2 fma.bf16x2) per word."""
    return tl.inline_asm_elementwise(
        asm=_DQ2_ASM, constraints="=h," * 16 + "r,h,h", args=[words, s.to(tl.bfloat16), z.to(tl.bfloat16)],
        dtype=_BF16X16, is_pure=True, pack=1)


@triton.jit
def _dq3_bf16x2(words, hi, s, z):
    """``_dq2_bf16x2`` for int3 experts (2-bit plane ``words`` + high-bit plane ``hi``, bit j = the high bit of slot
    j, i.e. the plane word already shifted by ``psh``): one more shift + lop3 per pair ORs the high bits into bit 2
    of the codes (``q = lo | hi << 2``)."""
    return tl.inline_asm_elementwise(
        asm=_DQ3_ASM, constraints="=h," * 16 + "r,r,h,h", args=[words, hi, s.to(tl.bfloat16), z.to(tl.bfloat16)],
        dtype=_BF16X16, is_pure=True, pack=1)


def _codes_asm(bits: int) -> str:
    """PTX body of the GSCALE code split (``_codes_bf16``) of one 32-bit word of ``bits`` = 4 or 2: outputs
    ``$0 .. $(PER-1)`` = code slots as exact bf16 ``128 + code`` (no scale/zero: GSCALE applies them per group to the
    partial sums), then the word. Per pair of slots i, i + PER/2: one shift (none for i = 0) and one ``lop3``
    (``(w >> bits*i) & mask | 0x43004300``), i.e. ~0.5 instruction per weight instead of ``_dq_asm``'s ~1.5."""
    if bits not in (2, 4):
        raise ValueError(f"_codes_asm: bits must be 2 or 4, got {bits}")
    per = 32 // bits
    mask = "0x000f000f" if bits == 4 else "0x00030003"
    lines = ["{", ".reg .b32 t, c;"]
    for i in range(per // 2):
        if i:
            lines.append(f"shr.u32 c, ${per}, {bits * i};")
        lines += [f"lop3.b32 t, {f'${per}' if i == 0 else 'c'}, {mask}, 0x43004300, 0xea;",
                  f"mov.b32 {{${i}, ${i + per // 2}}}, t;"]
    return "\n".join(lines + ["}"])


_CODES4_ASM = tl.constexpr(_codes_asm(4))
_CODES2_ASM = tl.constexpr(_codes_asm(2))


@triton.jit
def _codes_bf16(words, BITS: tl.constexpr):
    """The 32/BITS code slots of ``words`` (4- or 2-bit) as bf16 tensors holding ``128 + code`` (exact: integers
    <= 255 are bf16 values); slot j = K row ``kw*PER + j``."""
    if BITS == 4:
        res = tl.inline_asm_elementwise(asm=_CODES4_ASM, constraints="=h," * 8 + "r", args=[words],
                                        dtype=_BF16X8, is_pure=True, pack=1)
    else:
        res = tl.inline_asm_elementwise(asm=_CODES2_ASM, constraints="=h," * 16 + "r", args=[words],
                                        dtype=_BF16X16, is_pure=True, pack=1)
    return res


@triton.jit
def _mma(a, w, acc, IS_FP32: tl.constexpr, SWAP: tl.constexpr):
    """acc += a @ w (a ``[BM, k]`` activations, w ``[k, BN]`` weights); SWAP: acc^T += w @ a with w ``[BN, k]``
    and a ``[k, BM]``, so the weights are the dot's A operand (sm90: wgmma's register operand)."""
    if SWAP:
        if IS_FP32:
            acc = tl.dot(w.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(a.dtype), a, acc)
    else:
        acc = _dot(a, w, acc, IS_FP32)
    return acc


@triton.jit
def _w_step(acc, acc2, acc3, acc3b, a_ptrs, a_mask, w, w2, DUAL: tl.constexpr, FMA: tl.constexpr,
            SWAP: tl.constexpr = False):
    """``_slot_step`` for an already dequantized bf16 slot ``w`` (and ``w2``, the up half)."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    if FMA:
        af = a.to(tl.float32)[:, :, None]
        acc3 += af * w.to(tl.float32)[None, :, :]
        if DUAL:
            acc3b += af * w2.to(tl.float32)[None, :, :]
    else:
        acc = _mma(a.to(tl.bfloat16), w, acc, False, SWAP)
        if DUAL:
            acc2 = _mma(a.to(tl.bfloat16), w2, acc2, False, SWAP)
    return acc, acc2, acc3, acc3b


@triton.jit
def _slot_step(acc, acc2, acc3, acc3b, a_ptrs, a_mask, words, s, z, p0, sp0, p1, sp1, words2, s2, z2, q0, tp0, q1,
               tp1, psh, J, KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr, DUAL: tl.constexpr,
               IS_FP32: tl.constexpr, FMA: tl.constexpr, SWAP: tl.constexpr = False):
    """One code slot J of a word tile: the activation columns of K rows ``kr + J`` times the dequantized slot, into
    acc/acc2 (tl.dot) or acc3/acc3b (FMA: fp32 broadcast-multiply, reduced over K by the caller)."""
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    if FMA:
        af = a.to(tl.float32)[:, :, None]
        acc3 += af * _dq(words, s, z, p0, sp0, p1, sp1, psh, J, KIND, BITS, NP)[None, :, :]
        if DUAL:
            acc3b += af * _dq(words2, s2, z2, q0, tp0, q1, tp1, psh, J, KIND, BITS, NP)[None, :, :]
    else:
        acc = _mma(a, _dq(words, s, z, p0, sp0, p1, sp1, psh, J, KIND, BITS, NP), acc, IS_FP32, SWAP)
        if DUAL:
            acc2 = _mma(a, _dq(words2, s2, z2, q0, tp0, q1, tp1, psh, J, KIND, BITS, NP), acc2, IS_FP32, SWAP)
    return acc, acc2, acc3, acc3b


@triton.jit
def _dq_ktile(words, s, z, p0, sp0, p1, sp1, psh, KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr):
    """Every code slot of a ``[BKW, BN]`` word tile at once: the ``[BKW*PER, BN]`` fp32 weights of K rows
    ``kw*PER + j`` (word-major, i.e. K order), built by broadcasting over a slot axis and merging it into K."""
    PER: tl.constexpr = 32 // BITS
    J = tl.arange(0, PER)[None, :, None]
    if KIND >= 3:
        p0 = p0[:, None, :]
        if NP == 2:
            p1 = p1[:, None, :]
    if KIND == 4:
        sp0 = sp0[:, None, :]
        if NP == 2:
            sp1 = sp1[:, None, :]
    w = _dq(words[:, None, :], s[:, None, :], z[:, None, :], p0, sp0, p1, sp1, psh[:, :, None], J, KIND, BITS, NP)
    return tl.reshape(w, (words.shape[0] * PER, words.shape[1]))


@triton.jit
def _int_loop_kt(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g,
                 wcols, n_up, K, k_lo, k_hi, offs_n, n_mask, KIND: tl.constexpr, BITS: tl.constexpr,
                 NP: tl.constexpr, DUAL: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr):
    """``_int_loop`` with one ``tl.dot`` per step over all code slots (config ``KT``): a step dequantizes
    ``8*BLOCK_K`` K rows (``BLOCK_K*BITS/4`` code words per column) into one K-ordered tile and reads the matching
    activation columns contiguously, so the weights cross shared memory once per step (one barrier) instead of
    once per code slot."""
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BLOCK_K * BITS // 4
    KR: tl.constexpr = BKW * PER
    kw_lo = k_lo // PER
    kw_hi = k_hi // PER
    col = offs_n[None, :]
    col2 = col + n_up
    offs_w = tl.arange(0, BKW)
    offs_k = tl.arange(0, KR)
    (words, s, z, p0, sp0, p1, sp1, words2, s2, z2, q0, tp0, q1,
     tp1) = _load_tiles(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi, kw_lo, col, col2, n_mask,
                        KIND, BITS, NP, BKW, DUAL)
    for w0 in range(kw_lo, kw_hi, BKW):
        (nwords, ns, nz, np0, nsp0, np1, nsp1, nwords2, ns2, nz2, nq0, ntp0, nq1,
         ntp1) = _load_tiles(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi, w0 + BKW, col, col2,
                             n_mask, KIND, BITS, NP, BKW, DUAL)
        psh = ((w0 + offs_w) * PER % 32)[:, None]
        kr = w0 * PER + offs_k
        a = tl.load(x_ptr + x_rows[:, None] * stride_xm + kr[None, :], mask=row_mask[:, None] & (kr < k_hi)[None, :],
                    other=0.0)
        acc = _dot(a, _dq_ktile(words, s, z, p0, sp0, p1, sp1, psh, KIND, BITS, NP), acc, IS_FP32)
        if DUAL:
            acc2 = _dot(a, _dq_ktile(words2, s2, z2, q0, tp0, q1, tp1, psh, KIND, BITS, NP), acc2, IS_FP32)
        words, s, z, p0, sp0, p1, sp1 = nwords, ns, nz, np0, nsp0, np1, nsp1
        words2, s2, z2, q0, tp0, q1, tp1 = nwords2, ns2, nz2, nq0, ntp0, nq1, ntp1
    return acc, acc2


@triton.jit
def _int_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols,
              n_up, K, k_lo, k_hi, offs_n, n_mask, KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr,
              DUAL: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr, FMA: tl.constexpr,
              ASM: tl.constexpr = False, SWAP: tl.constexpr = False):
    """acc (+acc2 for the up half when DUAL) += x[rows, k_lo:k_hi] @ dequant(W)[:, k_lo:k_hi]^T for an integer
    expert (k_lo, k_hi multiples of 32: whole code words of every width; split-K programs own one range each).
    The next tile's words/metadata are loaded (into registers) before the current tile's dots: two tiles in flight
    per program on top of the compiler's pipelining.

    SWAP (tensor-core loop only): tiles are loaded ``[BN, BKW]`` and each slot computes
    ``accT[BN, BM] += W_slot[BN, BKW] @ x_slot^T[BKW, BM]``, so the dequantized weights are the dot's A operand: on
    sm90 with BN >= 64 per warp group the compiler emits ``warp_group_dot`` with A in registers, building the code
    words (and scale/zero) in the dot-operand layout at the load, with no shared-memory round trip of the weights
    (only the ``[BKW, BM]`` activation slice goes through shared memory, as wgmma's B). accT is transposed once at
    the end."""
    PER: tl.constexpr = 32 // BITS
    # code words per step: BLOCK_K, but for B < 4 at most the K rows of a 4-bit step (min 16 words), so the
    # activation columns a step reads (BLOCK_M x BLOCK_K*8 at most, or 16*PER) stay bounded for 1/2-bit experts
    BKW0: tl.constexpr = (BLOCK_K * BITS // 4) if BITS < 4 else BLOCK_K
    BKW: tl.constexpr = 16 if BKW0 < 16 else BKW0
    SW: tl.constexpr = SWAP and not FMA
    ASM_OK: tl.constexpr = ASM and not IS_FP32 and x_ptr.dtype.element_ty == tl.bfloat16 and KIND <= 3
    ASM4: tl.constexpr = ASM_OK and KIND == 2 and BITS == 4
    ASM2: tl.constexpr = ASM_OK and BITS == 2  # int2 and int3 (2-bit plane + high-bit plane)
    kw_lo = k_lo // PER
    kw_hi = k_hi // PER
    offs_w = tl.arange(0, BKW)
    # FMA (few rows per expert): acc3 += a[:, :, None] * w[None] in fp32 registers, reduced over K once at the end
    # (no tensor-core operand shuffles; BLOCK_M may be < 16)
    acc3 = 0.0
    acc3b = 0.0
    if FMA:
        acc3 = tl.zeros((acc.shape[0], BKW, acc.shape[1]), dtype=tl.float32)
        acc3b = tl.zeros((acc.shape[0], BKW, acc.shape[1]), dtype=tl.float32)
    if SW:
        col = offs_n[:, None]
        ac = tl.zeros((acc.shape[1], acc.shape[0]), dtype=tl.float32)
        ac2 = tl.zeros((acc.shape[1], acc.shape[0]), dtype=tl.float32)
    else:
        col = offs_n[None, :]
        ac = acc
        ac2 = acc2
    col2 = col + n_up
    # SWAP with 1-bit planes (int3, nested: 2-bit words, 2 word rows per plane word): word rows of one parity per
    # sub-step, so the plane bits of a row sit at the constant bit offset 16*parity (a runtime per-row shift would
    # keep the dequant off the dot-operand layout: only loads and constants may feed it)
    NPAR: tl.constexpr = 2 if SW and KIND >= 3 else 1
    if not SW:  # SWAP: no register prefetch (a loop-carried tile is not built in the dot-operand layout at its load)
        (words, s, z, p0, sp0, p1, sp1, words2, s2, z2, q0, tp0, q1,
         tp1) = _load_tiles(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi, kw_lo, col, col2,
                            n_mask, KIND, BITS, NP, BKW, DUAL)
    for w0 in range(kw_lo, kw_hi, BKW * NPAR):
        for par in tl.static_range(NPAR):
            if SW:  # this step's tile, loaded here: the compiler pipelines it (cp.async) and converts it at the load
                (words, s, z, p0, sp0, p1, sp1, words2, s2, z2, q0, tp0, q1,
                 tp1) = _load_tiles(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi, w0 + par, col,
                                    col2, n_mask, KIND, BITS, NP, BKW, DUAL, SW, NPAR)
            else:
                (nwords, ns, nz, np0, nsp0, np1, nsp1, nwords2, ns2, nz2, nq0, ntp0, nq1,
                 ntp1) = _load_tiles(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, kw_hi, w0 + BKW,
                                     col, col2, n_mask, KIND, BITS, NP, BKW, DUAL)
            wr = w0 + par + offs_w * NPAR
            kr = wr * PER  # K row of code slot 0 of each word
            if SW:  # activations as [BKW, BM]: x^T slices; plane bit offset: constant per parity
                psh = 16 * par
                a_ptrs = x_ptr + x_rows[None, :] * stride_xm + kr[:, None]
                a_mask = row_mask[None, :] & (wr < kw_hi)[:, None]
            else:
                psh = (kr % 32)[:, None]  # bit of row kr in its 1-bit plane word (PER divides 32)
                a_ptrs = x_ptr + x_rows[:, None] * stride_xm + kr[None, :]
                a_mask = row_mask[:, None] & (wr < kw_hi)[None, :]
            if ASM4:  # packed-bf16 PTX dequant, 8 slots per word
                ws = _dq4_bf16x2(words, s, z)
                ws2 = ws
                if DUAL:
                    ws2 = _dq4_bf16x2(words2, s2, z2)
                for j in tl.static_range(8):
                    ac, ac2, acc3, acc3b = _w_step(ac, ac2, acc3, acc3b, a_ptrs + j, a_mask, ws[j], ws2[j], DUAL, FMA,
                                                   SW)
            elif ASM2:  # 16 slots per word (int3: the high-bit plane ORed in by the same PTX)
                if KIND == 3:
                    ws = _dq3_bf16x2(words, p0 >> psh, s, z)
                else:
                    ws = _dq2_bf16x2(words, s, z)
                ws2 = ws
                if DUAL:
                    if KIND == 3:
                        ws2 = _dq3_bf16x2(words2, q0 >> psh, s2, z2)
                    else:
                        ws2 = _dq2_bf16x2(words2, s2, z2)
                for j in tl.static_range(16):
                    ac, ac2, acc3, acc3b = _w_step(ac, ac2, acc3, acc3b, a_ptrs + j, a_mask, ws[j], ws2[j], DUAL, FMA,
                                                   SW)
            elif PER <= 8 or (SW and PER <= 16):  # 4/8-bit (SWAP: and 2-bit kinds): unrolled code slots (SWAP:
                # a runtime slot index would be a non-constant shift, which keeps the dequant off the operand layout)
                for j in tl.static_range(PER):
                    ac, ac2, acc3, acc3b = _slot_step(ac, ac2, acc3, acc3b, a_ptrs + j, a_mask, words, s, z, p0, sp0,
                                                      p1, sp1, words2, s2, z2, q0, tp0, q1, tp1, psh, j, KIND,
                                                      BITS, NP, DUAL, IS_FP32, FMA, SW)
            else:  # 1/2-bit (16-32 slots): a runtime loop keeps the compiled kernel (and compile time) small
                for j in range(PER):
                    ac, ac2, acc3, acc3b = _slot_step(ac, ac2, acc3, acc3b, a_ptrs + j, a_mask, words, s, z, p0, sp0,
                                                      p1, sp1, words2, s2, z2, q0, tp0, q1, tp1, psh, j, KIND,
                                                      BITS, NP, DUAL, IS_FP32, FMA, SW)
            if not SW:
                words, s, z, p0, sp0, p1, sp1 = nwords, ns, nz, np0, nsp0, np1, nsp1
                words2, s2, z2, q0, tp0, q1, tp1 = nwords2, ns2, nz2, nq0, ntp0, nq1, ntp1
    if SW:  # one transpose back to the epilogue's [BM, BN]
        acc += tl.trans(ac)
        if DUAL:
            acc2 += tl.trans(ac2)
    else:
        acc = ac
        acc2 = ac2
    if FMA:
        acc += tl.sum(acc3, axis=1)
        if DUAL:
            acc2 += tl.sum(acc3b, axis=1)
    return acc, acc2


@triton.jit
def _int_loop_gs(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, meta_ptr, qoff, moff, g, wcols, n_up, K,
                 k_lo, k_hi, offs_n, n_mask, BITS: tl.constexpr, DUAL: tl.constexpr, BLOCK_K: tl.constexpr,
                 IS_FP32: tl.constexpr, ASM: tl.constexpr):
    """The SWAP K loop of a plain int4 expert (written for BITS 4 or 2) with scale and zero applied per group to partial sums (config
    ``GSCALE``; the launcher enables it only when every step of ``BKW*PER`` K rows lies inside one quantization
    group: ``BKW*PER`` divides g and the program's K range starts on a step). Per step::

        part[BN, BM] = sum_j Q_j[BN, BKW] @ x_j[BKW, BM]        (codes only: the dot's register A operand)
        accT[BN, BM] += s[BN, None] * part + z'[BN, None] * xsum[None, BM]

    with ``xsum`` the sum of the step's activation rows and s / z the step's group row, loaded once per step as
    ``[BN]`` vectors. ASM (bf16 activations): codes enter the dot as exact bf16 ``128 + q`` (one ``lop3`` per 2
    weights, ``_codes_bf16``), so ``z' = z - 128 s``; otherwise as ``q`` (``_code_f32``, exact) and ``z' = z``. The
    weights are never rounded to bf16 (more exact than the per-element dequant); partials accumulate in fp32."""
    PER: tl.constexpr = 32 // BITS
    BKW0: tl.constexpr = (BLOCK_K * BITS // 4) if BITS < 4 else BLOCK_K
    BKW: tl.constexpr = 16 if BKW0 < 16 else BKW0
    STEP: tl.constexpr = BKW * PER
    USE_ASM: tl.constexpr = ASM and not IS_FP32 and x_ptr.dtype.element_ty == tl.bfloat16
    kw_lo = k_lo // PER
    kw_hi = k_hi // PER
    kg = K // g
    offs_w = tl.arange(0, BKW)
    offs_s = tl.arange(0, STEP)
    col = offs_n[:, None]
    ac = tl.zeros((acc.shape[1], acc.shape[0]), dtype=tl.float32)
    ac2 = tl.zeros((acc.shape[1], acc.shape[0]), dtype=tl.float32)
    for w0 in range(kw_lo, kw_hi, BKW):
        wr = w0 + offs_w
        m2 = (wr < kw_hi)[None, :] & n_mask[:, None]
        wp = qw_ptr + qoff + wr[None, :] * wcols + col  # [BN, BKW] words (SWAP orientation, no transpose)
        words = tl.load(wp, mask=m2, other=0)
        words2 = words
        if DUAL:
            words2 = tl.load(wp + n_up, mask=m2, other=0)
        a_ptrs = x_ptr + x_rows[None, :] * stride_xm + (wr * PER)[:, None]
        a_mask = row_mask[None, :] & (wr < kw_hi)[:, None]
        part = tl.zeros((acc.shape[1], acc.shape[0]), dtype=tl.float32)
        part2 = tl.zeros((acc.shape[1], acc.shape[0]), dtype=tl.float32)
        if USE_ASM:
            ws = _codes_bf16(words, BITS)
            ws2 = ws
            if DUAL:
                ws2 = _codes_bf16(words2, BITS)
            for j in tl.static_range(PER):
                a = tl.load(a_ptrs + j, mask=a_mask, other=0.0)
                part = tl.dot(ws[j], a, part)
                if DUAL:
                    part2 = tl.dot(ws2[j], a, part2)
        else:
            for j in tl.static_range(PER):
                a = tl.load(a_ptrs + j, mask=a_mask, other=0.0)
                part = _mma(a, _code_f32((words >> (j * BITS)) & ((1 << BITS) - 1)), part, IS_FP32, True)
                if DUAL:
                    part2 = _mma(a, _code_f32((words2 >> (j * BITS)) & ((1 << BITS) - 1)), part2, IS_FP32, True)
        # sum of the step's activation rows (rows past k_hi and padding tokens read as 0): one [STEP, BM] load
        kr = w0 * PER + offs_s
        xa = tl.load(x_ptr + x_rows[None, :] * stride_xm + kr[:, None], mask=row_mask[None, :] & (kr < k_hi)[:, None],
                     other=0.0)
        xsum = tl.sum(xa.to(tl.float32), axis=0)[None, :]
        sp = meta_ptr + moff + ((w0 * PER) // g) * wcols + offs_n  # the step's group row of scales
        s = tl.load(sp, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(sp + kg * wcols, mask=n_mask, other=0.0).to(tl.float32)
        if USE_ASM:
            z = z - 128.0 * s
        ac += s[:, None] * part + z[:, None] * xsum
        if DUAL:
            s2 = tl.load(sp + n_up, mask=n_mask, other=0.0).to(tl.float32)
            z2 = tl.load(sp + kg * wcols + n_up, mask=n_mask, other=0.0).to(tl.float32)
            if USE_ASM:
                z2 = z2 - 128.0 * s2
            ac2 += s2[:, None] * part2 + z2[:, None] * xsum
    acc += tl.trans(ac)
    if DUAL:
        acc2 += tl.trans(ac2)
    return acc, acc2


@triton.jit
def _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols,
             n_up, K, k_lo, k_hi, offs_n, n_mask, KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr,
             DUAL: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr, FMA: tl.constexpr, KT: tl.constexpr,
             ASM: tl.constexpr, SWAP: tl.constexpr = False, GS: tl.constexpr = False):
    """The integer K loop the config selects: ``_int_loop_kt`` (KT, tensor cores), ``_int_loop_gs`` (GS: SWAP with
    per-group scale/zero, plain int4 only, enabled by the launcher), else ``_int_loop`` (ASM: the
    packed-bf16 dequant for 4-bit experts)."""
    if GS and SWAP and not FMA and not KT and KIND == 2 and BITS == 4:
        acc, acc2 = _int_loop_gs(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, meta_ptr, qoff, moff, g,
                                 wcols, n_up, K, k_lo, k_hi, offs_n, n_mask, BITS, DUAL, BLOCK_K, IS_FP32, ASM)
    elif KT and not FMA:
        acc, acc2 = _int_loop_kt(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr, qoff, poff,
                                 moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask, KIND, BITS, NP, DUAL,
                                 BLOCK_K, IS_FP32)
    else:
        acc, acc2 = _int_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr, qoff, poff,
                              moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask, KIND, BITS, NP, DUAL, BLOCK_K,
                              IS_FP32, FMA, ASM, SWAP)
    return acc, acc2


@triton.jit
def _bf16_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, wbf_ptr, woff, wcols, n_up, k_lo, k_hi, offs_n,
               n_mask, DUAL: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr, FMA: tl.constexpr):
    """acc (+acc2) += x[rows, k_lo:k_hi] @ W[:, k_lo:k_hi]^T for a bf16 expert (weights fed straight to tl.dot, 2*BLOCK_K rows a step;
    FMA: fp32 broadcast-multiply, reduced once at the end)."""
    BK: tl.constexpr = 2 * BLOCK_K
    offs_kb = tl.arange(0, BK)
    acc3 = 0.0
    acc3b = 0.0
    if FMA:
        acc3 = tl.zeros((acc.shape[0], BK, acc.shape[1]), dtype=tl.float32)
        acc3b = tl.zeros((acc.shape[0], BK, acc.shape[1]), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + offs_kb
        km = offs_k < k_hi
        a = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :], mask=row_mask[:, None] & km[None, :],
                    other=0.0)
        wp = wbf_ptr + woff + offs_k[:, None] * wcols + offs_n[None, :]
        wmask = km[:, None] & n_mask[None, :]
        if FMA:
            af = a.to(tl.float32)[:, :, None]
            acc3 += af * tl.load(wp, mask=wmask, other=0.0).to(tl.float32)[None, :, :]
            if DUAL:
                acc3b += af * tl.load(wp + n_up, mask=wmask, other=0.0).to(tl.float32)[None, :, :]
        else:
            acc = _dot(a, tl.load(wp, mask=wmask, other=0.0), acc, IS_FP32)
            if DUAL:
                acc2 = _dot(a, tl.load(wp + n_up, mask=wmask, other=0.0), acc2, IS_FP32)
    if FMA:
        acc += tl.sum(acc3, axis=1)
        if DUAL:
            acc2 += tl.sum(acc3b, axis=1)
    return acc, acc2


@triton.jit(do_not_specialize=["num_valid", "stride_ks"])  # T-dependent ints: one binary for all T
def grouped_gemm_kernel(x_ptr, out_ptr, qw_ptr, pw_ptr, meta_ptr, wbf_ptr, einfo_ptr,
                        sorted_ids_ptr, block_expert_ptr, num_post_ptr, topk_w_ptr,
                        N, K, wcols, n_up, stride_xm, stride_om, a_div, num_valid, k_split, stride_ks,
                        MODE: tl.constexpr, DENSE: tl.constexpr, NFIELDS: tl.constexpr, IS_FP32: tl.constexpr,
                        KINDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FMA: tl.constexpr = False, SPLIT_K: tl.constexpr = 1, KT: tl.constexpr = False,
                        ASM: tl.constexpr = False, SWAP: tl.constexpr = False, GSCALE: tl.constexpr = 0):
    """Grid (m-blocks, cdiv(N, BLOCK_N), splits). SPLIT_K > 1: program z owns K rows [z*k_split, (z+1)*k_split)
    and stores fp32 partials (MODE 1: gate | up columns side by side; MODE 2: router weight applied) at
    ``out_ptr + z*stride_ks``; ``splitk_reduce_kernel`` sums them and applies the activation. Rows of block b: ``sorted_ids[b*BLOCK_M:(b+1)*BLOCK_M]`` (ids >= num_valid
    are padding), expert ``block_expert[b]``; DENSE: rows ``b*BLOCK_M + arange`` and expert 0. KINDS: bit mask of
    the expert kinds present (``layout.kind_bit``), so only their K loops are compiled (compile time, registers).
    GSCALE: ``kind_bit`` mask (int4: 8) of the kinds whose SWAP loop applies scale/zero per group
    (``_int_loop_gs``), set by the launcher only where every K step lies inside one quantization group (int2: its
    steps are >= 256 rows, longer than any group the format allows, so it never qualifies)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    k_lo = 0
    k_hi = K
    if SPLIT_K > 1:
        k_lo = tl.program_id(2) * k_split
        k_hi = tl.minimum(K, k_lo + k_split)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if DENSE:
        rows = pid_m * BLOCK_M + offs_m
        e = 0
        live = True
    else:
        num_post = tl.load(num_post_ptr)
        e = tl.load(block_expert_ptr + pid_m)
        live = (pid_m * BLOCK_M < num_post) & (e >= 0)
        e = tl.maximum(e, 0)
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + offs_m)
    if live:
        row_mask = rows < num_valid
        x_rows = tl.where(row_mask, rows // a_div, 0)
        info = einfo_ptr + e * NFIELDS
        kind = tl.load(info + 0)
        bits = tl.load(info + 1)
        g = tl.maximum(tl.load(info + 2).to(tl.int32), 1)
        qoff = tl.load(info + 3) * 16  # offsets are stored in units of 16 elements (layout.OFF_UNIT): aligned
        poff = tl.load(info + 4) * 16
        moff = tl.load(info + 5) * 16
        woff = tl.load(info + 6) * 16
        npl = tl.load(info + 7)
        pm = (tl.load(info + 8), tl.load(info + 9), tl.load(info + 10))  # PMOFF, PWSTEP, PMSTEP (elements)
        DUAL: tl.constexpr = MODE == 1
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if (KINDS & 8) != 0:
            if (kind == 2) & (bits == 4):
                acc, acc2 = _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     qoff, poff, moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask,
                                      2, 4, 0, DUAL, BLOCK_K, IS_FP32, FMA, KT, ASM, SWAP,
                                     (GSCALE & 8) != 0)
        if (KINDS & 4) != 0:
            if (kind == 2) & (bits == 2):
                acc, acc2 = _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     qoff, poff, moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask,
                                      2, 2, 0, DUAL, BLOCK_K, IS_FP32, FMA, KT, ASM, SWAP)
        if (KINDS & 2) != 0:
            if (kind == 2) & (bits == 1):
                acc, acc2 = _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     qoff, poff, moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask,
                                      2, 1, 0, DUAL, BLOCK_K, IS_FP32, FMA, KT, ASM, SWAP)
        if (KINDS & 16) != 0:
            if (kind == 2) & (bits == 8):
                acc, acc2 = _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     qoff, poff, moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask,
                                      2, 8, 0, DUAL, BLOCK_K, IS_FP32, FMA, KT, ASM, SWAP)
        if (KINDS & 32) != 0:
            if kind == 3:
                acc, acc2 = _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     qoff, poff, moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask,
                                      3, 2, 1, DUAL, BLOCK_K, IS_FP32, FMA, KT, ASM, SWAP)
        if (KINDS & 64) != 0:
            if (kind == 4) & (npl == 1):
                acc, acc2 = _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     qoff, poff, moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask,
                                      4, 2, 1, DUAL, BLOCK_K, IS_FP32, FMA, KT, ASM, SWAP)
        if (KINDS & 128) != 0:
            if (kind == 4) & (npl == 2):
                acc, acc2 = _int_any(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     qoff, poff, moff, pm, g, wcols, n_up, K, k_lo, k_hi, offs_n, n_mask,
                                      4, 2, 2, DUAL, BLOCK_K, IS_FP32, FMA, KT, ASM, SWAP)
        if (KINDS & 1) != 0:
            if kind == 1:
                acc, acc2 = _bf16_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, wbf_ptr, woff, wcols, n_up,
                                       k_lo, k_hi, offs_n, n_mask, DUAL, BLOCK_K, IS_FP32, FMA)
        out_rows = tl.where(row_mask, rows, 0)
        omask = row_mask[:, None] & n_mask[None, :]
        if SPLIT_K > 1:  # fp32 partials; the reduce kernel applies SiLU-and-mul (MODE 1) after the sum
            part = out_ptr + tl.program_id(2) * stride_ks + out_rows[:, None] * stride_om + offs_n[None, :]
            if MODE == 2:
                acc = acc * tl.load(topk_w_ptr + x_rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
            tl.store(part, acc, mask=omask)
            if MODE == 1:
                tl.store(part + n_up, acc2, mask=omask)
        else:
            if MODE == 1:
                res = acc / (1.0 + tl.exp(-acc)) * acc2
            elif MODE == 2:
                tw = tl.load(topk_w_ptr + x_rows, mask=row_mask, other=0.0).to(tl.float32)
                res = acc * tw[:, None]
            else:
                res = acc
            tl.store(out_ptr + out_rows[:, None] * stride_om + offs_n[None, :], res.to(out_ptr.dtype.element_ty),
                     mask=omask)


@triton.jit(do_not_specialize=["total", "stride_ks"])
def splitk_reduce_kernel(part_ptr, out_ptr, total, n_out, stride_ks, SPLITS: tl.constexpr, MODE: tl.constexpr,
                         BLOCK: tl.constexpr):
    """out[r, c] = sum_z part[z, r, c] (MODE 1: silu(sum gate) * sum up, gate/up side by side in part's rows) for
    the ``total = rows * n_out`` elements of a contiguous ``out``; fixed summation order (z = 0, 1, ...)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < total
    r = offs // n_out
    c = offs % n_out
    width = 2 * n_out if MODE == 1 else n_out
    base = r * width + c
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for z in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + z * stride_ks + base, mask=m, other=0.0)
        if MODE == 1:
            acc2 += tl.load(part_ptr + z * stride_ks + base + n_out, mask=m, other=0.0)
    if MODE == 1:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dequant_rows(out_ptr, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K, r0, offs_n, n_mask,
                  KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr, ROWS: tl.constexpr):
    """Store bf16 W^T rows r0 .. r0+ROWS (K-major, row stride wcols) of one integer expert at out_ptr."""
    PER: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = ROWS // PER
    w0 = r0 // PER
    col = offs_n[None, :]
    words, s, z, p0, sp0, p1, sp1 = _load_tile(qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, wcols, K,
                                               K // PER, w0, col, n_mask, KIND, BITS, NP, BKW)
    wr = w0 + tl.arange(0, BKW)
    kr = wr * PER
    psh = (kr % 32)[:, None]
    m2 = (wr < K // PER)[:, None] & n_mask[None, :]
    for j in tl.static_range(PER):
        w = _dq(words, s, z, p0, sp0, p1, sp1, psh, j, KIND, BITS, NP)
        tl.store(out_ptr + (kr + j)[:, None] * wcols + col, w.to(tl.bfloat16), mask=m2)


@triton.jit
def dequant_kernel(out_ptr, qw_ptr, pw_ptr, meta_ptr, wbf_ptr, einfo_ptr, N, K,
                   NFIELDS: tl.constexpr, KINDS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (E, cdiv(K, 256), cdiv(N, BLOCK_N)): expert e's W^T rows [256*pid_k, +256) -> bf16 ``out[e, K, N]``
    (the prefill path: dequantize once, then the bf16 grouped GEMM). Experts with no weights are skipped."""
    e = tl.program_id(0)
    r0 = tl.program_id(1) * 256
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    info = einfo_ptr + e * NFIELDS
    kind = tl.load(info + 0)
    bits = tl.load(info + 1)
    g = tl.maximum(tl.load(info + 2).to(tl.int32), 1)
    qoff = tl.load(info + 3) * 16
    poff = tl.load(info + 4) * 16
    moff = tl.load(info + 5) * 16
    woff = tl.load(info + 6) * 16
    npl = tl.load(info + 7)
    pm = (tl.load(info + 8), tl.load(info + 9), tl.load(info + 10))  # PMOFF, PWSTEP, PMSTEP (elements)
    out = out_ptr + e.to(tl.int64) * K * N
    if (KINDS & 8) != 0:
        if (kind == 2) & (bits == 4):
            _dequant_rows(out, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, N, K, r0, offs_n, n_mask,
                          2, 4, 0, 256)
    if (KINDS & 4) != 0:
        if (kind == 2) & (bits == 2):
            _dequant_rows(out, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, N, K, r0, offs_n, n_mask,
                          2, 2, 0, 256)
    if (KINDS & 2) != 0:
        if (kind == 2) & (bits == 1):
            _dequant_rows(out, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, N, K, r0, offs_n, n_mask,
                          2, 1, 0, 256)
    if (KINDS & 16) != 0:
        if (kind == 2) & (bits == 8):
            _dequant_rows(out, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, N, K, r0, offs_n, n_mask,
                          2, 8, 0, 256)
    if (KINDS & 32) != 0:
        if kind == 3:
            _dequant_rows(out, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, N, K, r0, offs_n, n_mask,
                          3, 2, 1, 256)
    if (KINDS & 64) != 0:
        if (kind == 4) & (npl == 1):
            _dequant_rows(out, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, N, K, r0, offs_n, n_mask,
                          4, 2, 1, 256)
    if (KINDS & 128) != 0:
        if (kind == 4) & (npl == 2):
            _dequant_rows(out, qw_ptr, pw_ptr, meta_ptr, qoff, poff, moff, pm, g, N, K, r0, offs_n, n_mask,
                          4, 2, 2, 256)
    if (KINDS & 1) != 0:
        if kind == 1:
            rows = r0 + tl.arange(0, 256)
            m2 = (rows < K)[:, None] & n_mask[None, :]
            src = tl.load(wbf_ptr + woff + rows[:, None] * N + offs_n[None, :], mask=m2, other=0.0)
            tl.store(out + rows[:, None] * N + offs_n[None, :], src, mask=m2)
