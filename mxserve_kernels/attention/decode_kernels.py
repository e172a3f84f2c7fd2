"""@triton.jit kernels: split-K paged decode attention over packed K/V slots plus a full-precision token segment,
and the split merge.

Grid (B, H_kv, NS + 1). Programs s < NS each take a contiguous, BN-aligned chunk of the request's packed positions
[pk_lo, pk_hi) (flash-decoding split); program s == NS attends the request's fp tokens (sinks, recent window,
current token). Every program writes a normalised partial output and its log-sum-exp; ``merge_kernel`` combines
them. All q heads of one kv head are one [QGP, *] tile (GQA): each packed byte is loaded once per kv head.

Packed tiles are never expanded through per-element gathers: a tile is loaded as bytes [BN, NBT] (each code byte
once) plus the fp16 (scale, zero) pairs [BN, MP] (once per token and group), and unpacked in registers. Sub-code
``s`` of byte ``j`` lands in column ``j*PM + s`` (``tl.join`` + ``tl.reshape``: for 2/4/8-bit that is the slot's own
channel order); ternary digit 4 goes to a separate [BN, NBT] "extra" tile. q is gathered once per program into the
same column order (through ``k_perm``) and the V accumulator is scattered back through ``v_perm`` at the end, so
dot products never depend on the channel order. Softmax runs in base 2 (q pre-scaled by scale*log2(e)); the stored
lse is natural-log.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _i2f(code):
    """Small non-negative int32 -> exact fp32 without the quarter-rate I2F conversion (2^23 magic)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _div3(t):
    """floor(t / 3) for 0 <= t < 49152 (multiply-shift)."""
    return (t * 43691) >> 17


@triton.jit
def _digit(byte, S: tl.constexpr, BITS: tl.constexpr, TERN: tl.constexpr, QMAX: tl.constexpr):
    """Sub-code S of every byte (int32 [BN, NBT]). Ternary: base-3 digit S by chained exact /3 (the chain is shared
    by the digits of one byte after CSE: 3 integer ops per digit)."""
    if TERN:
        t = byte
        for _ in tl.static_range(S):
            t = _div3(t)
        return t - 3 * _div3(t)
    else:
        return (byte >> (S * BITS)) & QMAX


@triton.jit
def _deq(byte, sc, zr, S: tl.constexpr, BITS: tl.constexpr, TERN: tl.constexpr, QMAX: tl.constexpr):
    """fp32 [BN, NBT] = digit S * scale + zero."""
    return _i2f(_digit(byte, S, BITS, TERN, QMAX)) * sc + zr


@triton.jit
def _expand(byte, sc, zr, BN: tl.constexpr, NBT: tl.constexpr, PM: tl.constexpr, BITS: tl.constexpr,
            TERN: tl.constexpr, QMAX: tl.constexpr):
    """Bytes [BN, NBT] -> dequantized fp32 [BN, NBT*PM]; column j*PM + s holds sub-code s of byte j (PM in 1,2,4)."""
    if PM == 1:
        out = _deq(byte, sc, zr, 0, BITS, TERN, QMAX)
    elif PM == 2:
        out = tl.reshape(tl.join(_deq(byte, sc, zr, 0, BITS, TERN, QMAX), _deq(byte, sc, zr, 1, BITS, TERN, QMAX)),
                         [BN, NBT * 2])
    else:
        a = tl.join(_deq(byte, sc, zr, 0, BITS, TERN, QMAX), _deq(byte, sc, zr, 2, BITS, TERN, QMAX))
        c = tl.join(_deq(byte, sc, zr, 1, BITS, TERN, QMAX), _deq(byte, sc, zr, 3, BITS, TERN, QMAX))
        out = tl.reshape(tl.join(a, c), [BN, NBT * 4])  # [j, i, k] -> digit 2i + k at column 4j + 2i + k
    return out


@triton.jit
def _meta_cols(m, BN: tl.constexpr, NBT: tl.constexpr, MP: tl.constexpr, NBG: tl.constexpr, NG: tl.constexpr):
    """Raw meta [BN, MP] fp16 (scale, zero per group) -> per-byte-column scale and zero [BN, NBT] fp32."""
    m = m.to(tl.float32)
    mc = tl.arange(0, MP)[None, :]
    grp = (tl.arange(0, NBT) // NBG)[None, :]
    sc = tl.zeros([BN, NBT], tl.float32)
    zr = tl.zeros([BN, NBT], tl.float32)
    for g in tl.static_range(NG):
        s_g = tl.sum(tl.where(mc == 2 * g, m, 0.0), axis=1)
        z_g = tl.sum(tl.where(mc == 2 * g + 1, m, 0.0), axis=1)
        sc = tl.where(grp == g, s_g[:, None], sc)
        zr = tl.where(grp == g, z_g[:, None], zr)
    return sc, zr


@triton.jit
def _col_map(c, PM: tl.constexpr, S0: tl.constexpr, G: tl.constexpr, NBG: tl.constexpr, NB: tl.constexpr,
             PER: tl.constexpr):
    """Column c of an expanded tile -> (slot channel, valid). Column = j*PM + (s - S0) for byte j, sub-code s."""
    j = c // PM
    s = c % PM + S0
    w = (j % NBG) * PER + s
    return (j // NBG) * G + w, (j < NB) & (w < G)


@triton.jit
def _q_cols(q_ptr, qrow, gmask, perm_ptr, hk, c, PM: tl.constexpr, S0: tl.constexpr, G: tl.constexpr,
            NBG: tl.constexpr, NB: tl.constexpr, PER: tl.constexpr, D: tl.constexpr, HAS_PERM: tl.constexpr):
    """q [QGP, len(c)] fp32 in the expanded column order (0 on padding columns)."""
    ch, ok = _col_map(c, PM, S0, G, NBG, NB, PER)
    if HAS_PERM:
        ch = tl.load(perm_ptr + hk * D + ch, mask=ok, other=0)
    return tl.load(q_ptr + qrow[:, None] + ch[None, :], mask=gmask[:, None] & ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _store_cols(o_ptr, orow, gmask, perm_ptr, hk, c, val, PM: tl.constexpr, S0: tl.constexpr, G: tl.constexpr,
                NBG: tl.constexpr, NB: tl.constexpr, PER: tl.constexpr, D: tl.constexpr, HAS_PERM: tl.constexpr):
    """Scatter an expanded [QGP, len(c)] output tile back to natural channels."""
    ch, ok = _col_map(c, PM, S0, G, NBG, NB, PER)
    if HAS_PERM:
        ch = tl.load(perm_ptr + hk * D + ch, mask=ok, other=0)
    tl.store(o_ptr + orow[:, None] + ch[None, :], val, mask=gmask[:, None] & ok[None, :])


@triton.jit
def _page_split(pos, P: tl.constexpr):
    """(pos // P, pos % P) for pos >= 0: a shift and a mask when the page size P is a power of two (the signed
    division costs ~5 integer ops per token and tile layout)."""
    if (P & (P - 1)) == 0:
        return pos >> (P.bit_length() - 1), pos & (P - 1)
    else:
        return pos // P, pos % P


@triton.jit
def _load_meta(meta_ptr, half, vm2, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr, KMP: tl.constexpr,
               VMP: tl.constexpr, KNG: tl.constexpr, VNG: tl.constexpr):
    """K and V (scale, zero) fp16 pairs of a tile's tokens, [BN, KMP] and [BN, VMP] (``half`` = slot base / 2: the
    fp16 view's index; ``vm2`` = [BN, 1] valid tokens)."""
    mk = tl.arange(0, KMP)
    mv = tl.arange(0, VMP)
    km = tl.load(meta_ptr + half[:, None] + (KM_OFF // 2 + mk)[None, :], mask=vm2 & (mk < 2 * KNG)[None, :],
                 other=0.0)
    vmt = tl.load(meta_ptr + half[:, None] + (VM_OFF // 2 + mv)[None, :], mask=vm2 & (mv < 2 * VNG)[None, :],
                  other=0.0)
    return km, vmt


@triton.jit
def _load_tile(cache_ptr, meta_ptr, bt_ptr, bt_row, pos, valid, P: tl.constexpr, stride_cp, stride_ct, head_off,
               K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
               KNB: tl.constexpr, KNBT: tl.constexpr, KMP: tl.constexpr, KNG: tl.constexpr,
               VNB: tl.constexpr, VNBT: tl.constexpr, VMP: tl.constexpr, VNG: tl.constexpr):
    """Raw packed tile of positions ``pos`` [BN]: K/V code bytes [BN, *NBT] uint8, K/V meta [BN, *MP] fp16."""
    pidx, pin = _page_split(pos, P)
    page = tl.load(bt_ptr + bt_row + pidx, mask=valid, other=0).to(tl.int64)
    base = page * stride_cp + pin * stride_ct + head_off  # int64 byte offset of each slot
    jk = tl.arange(0, KNBT)
    jv = tl.arange(0, VNBT)
    vm2 = valid[:, None]
    kb = tl.load(cache_ptr + base[:, None] + (K_OFF + jk)[None, :], mask=vm2 & (jk < KNB)[None, :], other=0)
    vb = tl.load(cache_ptr + base[:, None] + (V_OFF + jv)[None, :], mask=vm2 & (jv < VNB)[None, :], other=0)
    half = base >> 1
    km, vmt = _load_meta(meta_ptr, half, vm2, KM_OFF, VM_OFF, KMP, VMP, KNG, VNG)
    return kb, vb, km, vmt


@triton.jit
def _dot(a, b, DT: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _dot_acc(a, b, acc, DT: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b (accumulated inside the MMA)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT), acc)


@triton.jit
def _split_and_q(q_ptr, lo_ptr, hi_ptr, kperm_ptr, qscale, b, hk, s, ns, qrow, gmask, HAS_KPERM: tl.constexpr,
                 QGP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, KG: tl.constexpr,
                 KNBG: tl.constexpr, KNB: tl.constexpr, KNBT: tl.constexpr, KPER: tl.constexpr, KPM: tl.constexpr,
                 KTERN: tl.constexpr):
    """The packed positions ``[start, end)`` split ``s`` of ``ns`` owns (whole ``BN`` tiles), the K column indices
    (``ck`` main sub-code columns, ``cx`` ternary digit-4 columns) and the scaled q tiles gathered into the slot's
    channel order (``qk`` [QGP, KNBT*KPM]; ``qx`` [QGP, KNBT], zeros unless K is ternary)."""
    lo = tl.load(lo_ptr + b).to(tl.int32)
    hi = tl.load(hi_ptr + b).to(tl.int32)
    per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), ns), BN) * BN
    start = lo + s * per
    end = tl.minimum(start + per, hi)
    ck = tl.arange(0, KNBT * KPM)
    cx = tl.arange(0, KNBT)
    qk = (_q_cols(q_ptr, qrow, gmask, kperm_ptr, hk, ck, KPM, 0, KG, KNBG, KNB, KPER, D, HAS_KPERM) * qscale).to(DT)
    if KTERN:
        qx = (_q_cols(q_ptr, qrow, gmask, kperm_ptr, hk, cx, 1, 4, KG, KNBG, KNB, KPER, D, HAS_KPERM)
              * qscale).to(DT)
    else:
        qx = tl.zeros([QGP, KNBT], DT)
    return start, end, ck, cx, qk, qx


@triton.jit
def _packed_part(q_ptr, cache_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, kperm_ptr, vperm_ptr, o_ptr, lse_ptr,
                 qscale, b, hk, s, ns, qrow, orow, lrow, gmask, stride_bt, stride_cp, stride_ct, stride_ch,
                 P: tl.constexpr, HAS_KPERM: tl.constexpr, HAS_VPERM: tl.constexpr, QGP: tl.constexpr, D: tl.constexpr,
                 BN: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
                 K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
                 KG: tl.constexpr, KNG: tl.constexpr, KNBG: tl.constexpr, KNB: tl.constexpr, KNBT: tl.constexpr,
                 KPER: tl.constexpr, KPM: tl.constexpr, KMP: tl.constexpr, KBITS: tl.constexpr,
                 KTERN: tl.constexpr, KQMAX: tl.constexpr,
                 VG: tl.constexpr, VNG: tl.constexpr, VNBG: tl.constexpr, VNB: tl.constexpr, VNBT: tl.constexpr,
                 VPER: tl.constexpr, VPM: tl.constexpr, VMP: tl.constexpr, VBITS: tl.constexpr,
                 VTERN: tl.constexpr, VQMAX: tl.constexpr):
    start, end, ck, cx, qk, qx = _split_and_q(q_ptr, lo_ptr, hi_ptr, kperm_ptr, qscale, b, hk, s, ns, qrow, gmask,
                                              HAS_KPERM, QGP, D, BN, DT, KG, KNBG, KNB, KNBT, KPER, KPM, KTERN)
    m_i = tl.full([QGP], float("-inf"), tl.float32)
    l_i = tl.zeros([QGP], tl.float32)
    acc = tl.zeros([QGP, VNBT * VPM], tl.float32)
    accx = tl.zeros([QGP, VNBT], tl.float32)
    n_offs = tl.arange(0, BN)
    bt_row = b * stride_bt
    head_off = hk * stride_ch
    pos = start + n_offs
    kb, vb, km, vm = _load_tile(cache_ptr, meta_ptr, bt_ptr, bt_row, pos, pos < end, P, stride_cp, stride_ct,
                                head_off, K_OFF, V_OFF, KM_OFF, VM_OFF, KNB, KNBT, KMP, KNG, VNB, VNBT, VMP, VNG)
    for n0 in range(start, end, BN):
        valid = n0 + n_offs < end
        # prefetch the next tile (all-masked past the end) while this one is unpacked
        npos = n0 + BN + n_offs
        kb2, vb2, km2, vm2 = _load_tile(cache_ptr, meta_ptr, bt_ptr, bt_row, npos, npos < end, P, stride_cp,
                                        stride_ct, head_off, K_OFF, V_OFF, KM_OFF, VM_OFF,
                                        KNB, KNBT, KMP, KNG, VNB, VNBT, VMP, VNG)
        kbi = kb.to(tl.int32)
        ksc, kzr = _meta_cols(km, BN, KNBT, KMP, KNBG, KNG)
        k = _expand(kbi, ksc, kzr, BN, KNBT, KPM, KBITS, KTERN, KQMAX)
        sc = _dot(qk, tl.trans(k), DT, IEEE)
        if KTERN:
            sc += _dot(qx, tl.trans(_deq(kbi, ksc, kzr, 4, KBITS, KTERN, KQMAX)), DT, IEEE)
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vbi = vb.to(tl.int32)
        vsc, vzr = _meta_cols(vm, BN, VNBT, VMP, VNBG, VNG)
        v = _expand(vbi, vsc, vzr, BN, VNBT, VPM, VBITS, VTERN, VQMAX)
        acc = acc * alpha[:, None] + _dot(p, v, DT, IEEE)
        if VTERN:
            accx = accx * alpha[:, None] + _dot(p, _deq(vbi, vsc, vzr, 4, VBITS, VTERN, VQMAX), DT, IEEE)
        m_i = m_new
        kb, vb, km, vm = kb2, vb2, km2, vm2
    has = l_i > 0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    _store_cols(o_ptr, orow, gmask, vperm_ptr, hk, tl.arange(0, VNBT * VPM), acc * inv[:, None], VPM, 0,
                VG, VNBG, VNB, VPER, D, HAS_VPERM)
    if VTERN:
        _store_cols(o_ptr, orow, gmask, vperm_ptr, hk, tl.arange(0, VNBT), accx * inv[:, None], 1, 4,
                    VG, VNBG, VNB, VPER, D, HAS_VPERM)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + lrow, lse, mask=gmask)


# ---- raw-code path: dot on the codes, scale/zero applied on the [QGP, BN] scores and the V row sums --------------
# Codes become "1 + c / 2^CB" floats (CB = 2 for 2-bit and ternary, 4 for 4-bit: the code sits in the top mantissa
# bits of 1.0), exact in bf16/fp16/fp32. With sc' = sc * 2^CB, k = sc' * (val - 1) + zr, so per group g
#   score = sum_g sc'_g * (q_g . val_g) + (zr_g - sc'_g) * sum(q_g)      (q_g: q on the columns of group g)
#   out   = sum_n r_n val_{n,d} + sum_n (p_n zr_{n,g} - r_n),  r_n = DT(p_n sc'_{n,g})
# (the offset is removed with the same rounded r_n the dot saw, so only r_n's rounding times val - 1 = c / 2^CB
# remains, as in the unpack path) and no per-element FMA / conversion is left: on sm90 the unpack is packed PTX
# (``_raw_asm``), 2 codes per op.
def _raw_asm(bits: float, f16: bool) -> str:
    """PTX body turning one 16-bit half-word of a slot's code bytes (b0 = low byte, b1 = high byte) into packed
    "1 + c / 2^CB" pairs. Operands: outputs ``$0 .. $(n-1)`` (16-bit: bf16, or fp16 when ``f16``), then the half.
    Output k holds byte ``k // PM``'s sub-code ``k % PM`` (PM = codes per byte in the main tile: 4 for 2-bit and
    ternary digits 0..3, 2 for 4-bit); ternary adds $8 / $9 = digit 4 of b0 / b1. n = 8 (2-bit), 4 (4-bit), 10.

    ``prmt`` puts b0 and b1 in the low bits of the two 16-bit lanes; 2/4-bit: per sub-code one shift aligns both
    lanes' codes with the top mantissa bits and one ``lop3`` ((x & mask) | 1.0 pair) makes the pair. Ternary, per
    digit on both lanes at once: q' = ((q * 171) >> 9) & 0x7f = q // 3 (exact for q < 256, product < 2^16 so the
    lanes never carry), t = q - 3 q' (no lane borrows), out = t * 2^TS + 1.0 (one mad)."""
    mant = 10 if f16 else 7
    one = 0x3C00 if f16 else 0x3F80
    cb = 4 if bits == 4 else 2
    ts = mant - cb  # code bits land at [ts, ts + cb)
    pair = f"0x{one:04x}{one:04x}"
    n = 10 if bits == 1.5 else (8 if bits == 2 else 4)
    lines = ["{", ".reg .b32 w, x, t, q, r;", f"mov.b32 w, {{${n}, ${n}}};", "prmt.b32 x, w, 0, 0x4140;"]
    if bits == 1.5:
        lines.append("mov.b32 q, x;")
        for d in range(5):
            if d < 4:
                lines += ["mul.lo.u32 r, q, 171;", "shr.u32 r, r, 9;", "and.b32 r, r, 0x007f007f;",
                          "mad.lo.u32 t, r, 0xfffffffd, q;", f"mad.lo.u32 t, t, {1 << ts}, {pair};",
                          f"mov.b32 {{${d}, ${d + 4}}}, t;", "mov.b32 q, r;"]
            else:
                lines += [f"mad.lo.u32 t, q, {1 << ts}, {pair};", "mov.b32 {$8, $9}, t;"]
    else:
        b = int(bits)
        pm = 8 // b
        mask = ((1 << b) - 1) << ts
        for s in range(pm):
            sh = ts - b * s
            op = f"shl.b32 t, x, {sh};" if sh > 0 else (f"shr.u32 t, x, {-sh};" if sh < 0 else "mov.b32 t, x;")
            lines += [op, f"lop3.b32 t, t, 0x{mask:04x}{mask:04x}, {pair}, 0xea;", f"mov.b32 {{${s}, ${s + pm}}}, t;"]
    return "\n".join(lines + ["}"])


_RAW2_BF16 = tl.constexpr(_raw_asm(2, False))
_RAW4_BF16 = tl.constexpr(_raw_asm(4, False))
_RAWT_BF16 = tl.constexpr(_raw_asm(1.5, False))
_RAW2_F16 = tl.constexpr(_raw_asm(2, True))
_RAW4_F16 = tl.constexpr(_raw_asm(4, True))
_RAWT_F16 = tl.constexpr(_raw_asm(1.5, True))
_BF16X4 = tl.constexpr((tl.bfloat16,) * 4)
_BF16X8 = tl.constexpr((tl.bfloat16,) * 8)
_BF16X10 = tl.constexpr((tl.bfloat16,) * 10)
_F16X4 = tl.constexpr((tl.float16,) * 4)
_F16X8 = tl.constexpr((tl.float16,) * 8)
_F16X10 = tl.constexpr((tl.float16,) * 10)


@triton.jit
def _raw_val(code, CB: tl.constexpr, DT: tl.constexpr):
    """Integer code -> 1 + code / 2^CB in DT (the portable twin of ``_raw_asm``; exact)."""
    return (_i2f(code) * (1.0 / (1 << CB)) + 1.0).to(DT)


@triton.jit
def _cat4(o0, o1, o2, o3, BN: tl.constexpr, N: tl.constexpr):
    """4 tensors [BN, N] -> [BN, 4N], column 4i + k = o_k[:, i]."""
    return tl.reshape(tl.join(tl.join(o0, o2), tl.join(o1, o3)), [BN, N * 4])


@triton.jit
def _cat8(o0, o1, o2, o3, o4, o5, o6, o7, BN: tl.constexpr, N: tl.constexpr):
    """8 tensors [BN, N] -> [BN, 8N], column 8i + k = o_k[:, i]."""
    return tl.reshape(tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7))),
                      [BN, N * 8])


@triton.jit
def _raw_tile(h, BN: tl.constexpr, NHT: tl.constexpr, BITS: tl.constexpr, TERN: tl.constexpr, QMAX: tl.constexpr,
              CB: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr, F16: tl.constexpr):
    """Half-words [BN, NHT] int16 -> main [BN, 2*NHT*PM] and extra [BN, 2*NHT] (ternary digit 4; else a copy of
    main's first columns, unused) of "1 + c / 2^CB" values in DT. Column j*PM + s (extra: j) = byte j's sub-code s,
    the ``_col_map`` order of the unpack path. ASM: ``_raw_asm`` PTX (sm80+, bf16/fp16 only)."""
    if ASM:
        if TERN:
            o0, o1, o2, o3, o4, o5, o6, o7, o8, o9 = tl.inline_asm_elementwise(
                asm=_RAWT_F16 if F16 else _RAWT_BF16, constraints="=h," * 10 + "h", args=[h],
                dtype=_F16X10 if F16 else _BF16X10, is_pure=True, pack=1)
            main = _cat8(o0, o1, o2, o3, o4, o5, o6, o7, BN, NHT)
            extra = tl.reshape(tl.join(o8, o9), [BN, NHT * 2])
        elif BITS == 2:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm=_RAW2_F16 if F16 else _RAW2_BF16, constraints="=h," * 8 + "h", args=[h],
                dtype=_F16X8 if F16 else _BF16X8, is_pure=True, pack=1)
            main = _cat8(o0, o1, o2, o3, o4, o5, o6, o7, BN, NHT)
            extra = tl.reshape(tl.join(o0, o1), [BN, NHT * 2])
        else:
            o0, o1, o2, o3 = tl.inline_asm_elementwise(
                asm=_RAW4_F16 if F16 else _RAW4_BF16, constraints="=h," * 4 + "h", args=[h],
                dtype=_F16X4 if F16 else _BF16X4, is_pure=True, pack=1)
            main = _cat4(o0, o1, o2, o3, BN, NHT)
            extra = tl.reshape(tl.join(o0, o1), [BN, NHT * 2])
    else:
        w = h.to(tl.int32) & 0xFFFF
        b0 = w & 0xFF
        b1 = w >> 8
        if TERN or BITS == 2:
            main = _cat8(_raw_val(_digit(b0, 0, BITS, TERN, QMAX), CB, DT), _raw_val(_digit(b0, 1, BITS, TERN, QMAX), CB, DT),
                         _raw_val(_digit(b0, 2, BITS, TERN, QMAX), CB, DT), _raw_val(_digit(b0, 3, BITS, TERN, QMAX), CB, DT),
                         _raw_val(_digit(b1, 0, BITS, TERN, QMAX), CB, DT), _raw_val(_digit(b1, 1, BITS, TERN, QMAX), CB, DT),
                         _raw_val(_digit(b1, 2, BITS, TERN, QMAX), CB, DT), _raw_val(_digit(b1, 3, BITS, TERN, QMAX), CB, DT),
                         BN, NHT)
        else:
            main = _cat4(_raw_val(_digit(b0, 0, BITS, TERN, QMAX), CB, DT), _raw_val(_digit(b0, 1, BITS, TERN, QMAX), CB, DT),
                         _raw_val(_digit(b1, 0, BITS, TERN, QMAX), CB, DT), _raw_val(_digit(b1, 1, BITS, TERN, QMAX), CB, DT),
                         BN, NHT)
        extra = tl.reshape(tl.join(_raw_val(_digit(b0, 4, BITS, TERN, QMAX), CB, DT),
                                   _raw_val(_digit(b1, 4, BITS, TERN, QMAX), CB, DT)), [BN, NHT * 2])
    return main, extra


@triton.jit
def _load_raw(meta_ptr, bt_ptr, bt_row, pos, valid, P: tl.constexpr, stride_cp, stride_ct, head_off,
              K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
              KNB: tl.constexpr, KNBT: tl.constexpr, KMP: tl.constexpr, KNG: tl.constexpr,
              VNB: tl.constexpr, VNBT: tl.constexpr, VMP: tl.constexpr, VNG: tl.constexpr):
    """``_load_tile`` in 16-bit words (the slot and the K/V code offsets are even): K/V code halves [BN, *NBT/2]
    int16 (through the fp16 view), K/V meta [BN, *MP] fp16."""
    pidx, pin = _page_split(pos, P)
    page = tl.load(bt_ptr + bt_row + pidx, mask=valid, other=0).to(tl.int64)
    half = (page * stride_cp + pin * stride_ct + head_off) >> 1
    jk = tl.arange(0, KNBT // 2)
    jv = tl.arange(0, VNBT // 2)
    vm2 = valid[:, None]
    kh = tl.load(meta_ptr + half[:, None] + (K_OFF // 2 + jk)[None, :], mask=vm2 & (2 * jk < KNB)[None, :],
                 other=0.0).to(tl.int16, bitcast=True)
    vh = tl.load(meta_ptr + half[:, None] + (V_OFF // 2 + jv)[None, :], mask=vm2 & (2 * jv < VNB)[None, :],
                 other=0.0).to(tl.int16, bitcast=True)
    km, vmt = _load_meta(meta_ptr, half, vm2, KM_OFF, VM_OFF, KMP, VMP, KNG, VNG)
    return kh, vh, km, vmt


@triton.jit
def _meta_g(m, mc, g: tl.constexpr, SCF: tl.constexpr):
    """Meta tile [BN, MP] fp32 -> (sc' = scale * SCF, zero) of group g, [BN] each."""
    s = tl.sum(tl.where(mc[None, :] == 2 * g, m, 0.0), axis=1) * SCF
    return s, tl.sum(tl.where(mc[None, :] == 2 * g + 1, m, 0.0), axis=1)


@triton.jit
def _col_grp(c, PM: tl.constexpr, NBG: tl.constexpr):
    """Group of column c (byte c // PM)."""
    return (c // PM) // NBG


@triton.jit
def _packed_part_raw(q_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, kperm_ptr, vperm_ptr, o_ptr, lse_ptr,
                     qscale, b, hk, s, ns, qrow, orow, lrow, gmask, stride_bt, stride_cp, stride_ct, stride_ch,
                     P: tl.constexpr, HAS_KPERM: tl.constexpr, HAS_VPERM: tl.constexpr, QGP: tl.constexpr, D: tl.constexpr,
                     BN: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, F16: tl.constexpr,
                     K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
                     KG: tl.constexpr, KNG: tl.constexpr, KNBG: tl.constexpr, KNB: tl.constexpr, KNBT: tl.constexpr,
                     KPER: tl.constexpr, KPM: tl.constexpr, KMP: tl.constexpr, KBITS: tl.constexpr,
                     KTERN: tl.constexpr, KQMAX: tl.constexpr,
                     VG: tl.constexpr, VNG: tl.constexpr, VNBG: tl.constexpr, VNB: tl.constexpr, VNBT: tl.constexpr,
                     VPER: tl.constexpr, VPM: tl.constexpr, VMP: tl.constexpr, VBITS: tl.constexpr,
                     VTERN: tl.constexpr, VQMAX: tl.constexpr):
    """``_packed_part`` with the dot on raw codes (see ``_raw_asm``): same split, prefetch, softmax and outputs."""
    KCB: tl.constexpr = 4 if KBITS == 4 else 2
    VCB: tl.constexpr = 4 if VBITS == 4 else 2
    start, end, ck, cx, qk, qx = _split_and_q(q_ptr, lo_ptr, hi_ptr, kperm_ptr, qscale, b, hk, s, ns, qrow, gmask,
                                              HAS_KPERM, QGP, D, BN, DT, KG, KNBG, KNB, KNBT, KPER, KPM, KTERN)
    gk = _col_grp(ck, KPM, KNBG)[None, :]
    gx = _col_grp(cx, 1, KNBG)[None, :]
    mk = tl.arange(0, KMP)
    mv = tl.arange(0, VMP)
    # per-group q sums (of the DT-rounded q the dots see), column g of [QGP, KMP]
    qs = tl.zeros([QGP, KMP], tl.float32)
    for g in tl.static_range(KNG):
        qsg = tl.sum(tl.where(gk == g, qk.to(tl.float32), 0.0), axis=1)
        if KTERN:
            qsg += tl.sum(tl.where(gx == g, qx.to(tl.float32), 0.0), axis=1)
        qs = tl.where(mk[None, :] == g, qsg[:, None], qs)
    m_i = tl.full([QGP], float("-inf"), tl.float32)
    l_i = tl.zeros([QGP], tl.float32)
    acc = tl.zeros([QGP, VNBT * VPM], tl.float32)
    accx = tl.zeros([QGP, VNBT], tl.float32)
    zt = tl.zeros([QGP, VMP], tl.float32)  # column g: sum_n p_n zr_{n,g} - rnd(p_n sc'_{n,g})
    cv = tl.arange(0, VNBT * VPM)
    gv = _col_grp(cv, VPM, VNBG)[None, :]
    gvx = _col_grp(tl.arange(0, VNBT), 1, VNBG)[None, :]
    n_offs = tl.arange(0, BN)
    bt_row = b * stride_bt
    head_off = hk * stride_ch
    pos = start + n_offs
    kh, vh, km, vm = _load_raw(meta_ptr, bt_ptr, bt_row, pos, pos < end, P, stride_cp, stride_ct, head_off,
                               K_OFF, V_OFF, KM_OFF, VM_OFF, KNB, KNBT, KMP, KNG, VNB, VNBT, VMP, VNG)
    for n0 in range(start, end, BN):
        valid = n0 + n_offs < end
        npos = n0 + BN + n_offs
        kh2, vh2, km2, vm2 = _load_raw(meta_ptr, bt_ptr, bt_row, npos, npos < end, P, stride_cp, stride_ct,
                                       head_off, K_OFF, V_OFF, KM_OFF, VM_OFF, KNB, KNBT, KMP, KNG, VNB, VNBT, VMP,
                                       VNG)
        kmf = km.to(tl.float32)
        kmain, kext = _raw_tile(kh, BN, KNBT // 2, KBITS, KTERN, KQMAX, KCB, DT, ASM, F16)
        sc = tl.zeros([QGP, BN], tl.float32)
        for g in tl.static_range(KNG):
            ksc, kzr = _meta_g(kmf, mk, g, 1 << KCB)
            if KNG == 1:
                sg = _dot(qk, tl.trans(kmain), DT, IEEE)
            else:
                sg = _dot(tl.where(gk == g, qk, 0.0).to(DT), tl.trans(kmain), DT, IEEE)
            if KTERN:
                sg += _dot(tl.where(gx == g, qx, 0.0).to(DT), tl.trans(kext), DT, IEEE)
            qsg = tl.sum(tl.where(mk[None, :] == g, qs, 0.0), axis=1)
            sc += sg * ksc[None, :] + qsg[:, None] * (kzr - ksc)[None, :]
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vmf = vm.to(tl.float32)
        vmain, vext = _raw_tile(vh, BN, VNBT // 2, VBITS, VTERN, VQMAX, VCB, DT, ASM, F16)
        acc = acc * alpha[:, None]
        accx = accx * alpha[:, None]
        zt = zt * alpha[:, None]
        for g in tl.static_range(VNG):
            vsc, vzr = _meta_g(vmf, mv, g, 1 << VCB)
            pv = (p * vsc[None, :]).to(DT)  # rounded once; the offset term below uses the same rounded values
            if VNG == 1:
                acc = _dot_acc(pv, vmain, acc, DT, IEEE)
                if VTERN:
                    accx = _dot_acc(pv, vext, accx, DT, IEEE)
            else:
                acc += tl.where(gv == g, _dot(pv, vmain, DT, IEEE), 0.0)
                if VTERN:
                    accx += tl.where(gvx == g, _dot(pv, vext, DT, IEEE), 0.0)
            zt = tl.where(mv[None, :] == g, zt + tl.sum(p * vzr[None, :] - pv.to(tl.float32), axis=1)[:, None], zt)
        m_i = m_new
        kh, vh, km, vm = kh2, vh2, km2, vm2
    has = l_i > 0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    zc = tl.zeros([QGP, VNBT * VPM], tl.float32)
    zcx = tl.zeros([QGP, VNBT], tl.float32)
    for g in tl.static_range(VNG):
        ztg = tl.sum(tl.where(mv[None, :] == g, zt, 0.0), axis=1)[:, None]
        zc = tl.where(gv == g, ztg, zc)
        zcx = tl.where(gvx == g, ztg, zcx)
    _store_cols(o_ptr, orow, gmask, vperm_ptr, hk, cv, (acc + zc) * inv[:, None], VPM, 0,
                VG, VNBG, VNB, VPER, D, HAS_VPERM)
    if VTERN:
        _store_cols(o_ptr, orow, gmask, vperm_ptr, hk, tl.arange(0, VNBT), (accx + zcx) * inv[:, None], 1, 4,
                    VG, VNBG, VNB, VPER, D, HAS_VPERM)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + lrow, lse, mask=gmask)


@triton.jit
def _fp_part(q_ptr, fpk_ptr, fpv_ptr, nf_ptr, o_ptr, lse_ptr, qscale, b, hk, qrow, orow, lrow, gmask,
             stride_fb, stride_ft, stride_fh, QGP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
             FBN: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr):
    d = tl.arange(0, DP)
    dmask = d < D
    q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0)
    q = (q.to(tl.float32) * qscale).to(DT)
    nf = tl.load(nf_ptr + b).to(tl.int32)
    m_i = tl.full([QGP], float("-inf"), tl.float32)
    l_i = tl.zeros([QGP], tl.float32)
    acc = tl.zeros([QGP, DP], tl.float32)
    n_offs = tl.arange(0, FBN)
    for n0 in range(0, nf, FBN):
        pos = n0 + n_offs
        valid = pos < nf
        fo = b * stride_fb + pos[:, None] * stride_ft + hk * stride_fh + d[None, :]
        fm = valid[:, None] & dmask[None, :]
        k = tl.load(fpk_ptr + fo, mask=fm, other=0.0).to(tl.float32)
        v = tl.load(fpv_ptr + fo, mask=fm, other=0.0).to(tl.float32)
        sc = _dot(q, tl.trans(k), DT, IEEE)
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, v, DT, IEEE)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(o_ptr + orow[:, None] + d[None, :], out, mask=gmask[:, None] & dmask[None, :])
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + lrow, lse, mask=gmask)


@triton.jit
def paged_decode_kernel(q_ptr, cache_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, fpk_ptr, fpv_ptr, nf_ptr,
                        kperm_ptr, vperm_ptr, o_ptr, lse_ptr, sm_scale, ns,
                        stride_qb, stride_qh, stride_bt, stride_cp, stride_ct, stride_ch, P: tl.constexpr,
                        stride_fb, stride_ft, stride_fh, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                        HAS_KPERM: tl.constexpr, HAS_VPERM: tl.constexpr,
                        QG: tl.constexpr, QGP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        BN: tl.constexpr, FBN: tl.constexpr, DOT_IEEE: tl.constexpr,
                        K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
                        KG: tl.constexpr, KNG: tl.constexpr, KNBG: tl.constexpr, KNB: tl.constexpr,
                        KNBT: tl.constexpr, KPER: tl.constexpr, KPM: tl.constexpr, KMP: tl.constexpr,
                        KBITS: tl.constexpr, KTERN: tl.constexpr, KQMAX: tl.constexpr,
                        VG: tl.constexpr, VNG: tl.constexpr, VNBG: tl.constexpr, VNB: tl.constexpr,
                        VNBT: tl.constexpr, VPER: tl.constexpr, VPM: tl.constexpr, VMP: tl.constexpr,
                        VBITS: tl.constexpr, VTERN: tl.constexpr, VQMAX: tl.constexpr,
                        RAW: tl.constexpr = False, ASM: tl.constexpr = False):
    """One (request b, kv head hk, split s) program; s == ns is the fp segment. Writes o[b, hq, s, :], lse[b, hq, s].
    RAW: packed splits dot on the raw codes (``_packed_part_raw``; 2/4-bit and ternary only, even K/V offsets);
    ASM: its unpack in PTX (bf16/fp16 q on sm80+, never under the interpreter).

    Shapes: q [B, Hq, D]; cache [pages, P, H, slot] uint8 (meta = its fp16 view); bt [B, max_pages] int32;
    fp_k/fp_v [B, F, H, D]; o [B, Hq, ns + 1, D] fp32; lse [B, Hq, ns + 1] fp32.
    """
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    g = tl.arange(0, QGP)
    gmask = g < QG
    hq = hk * QG + g
    qrow = b * stride_qb + hq * stride_qh
    orow = b * stride_ob + hq * stride_oh + s * stride_os
    lrow = b * stride_lb + hq * stride_lh + s
    qscale = sm_scale * LOG2E
    DT: tl.constexpr = tl.float32 if DOT_IEEE else q_ptr.dtype.element_ty
    if s < ns and RAW:
        _packed_part_raw(q_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, kperm_ptr, vperm_ptr, o_ptr, lse_ptr,
                         qscale, b, hk, s, ns, qrow, orow, lrow, gmask, stride_bt, stride_cp, stride_ct, stride_ch,
                         P, HAS_KPERM, HAS_VPERM, QGP, D, BN, DT, DOT_IEEE, ASM, q_ptr.dtype.element_ty == tl.float16,
                         K_OFF, V_OFF, KM_OFF, VM_OFF, KG, KNG, KNBG, KNB, KNBT, KPER, KPM, KMP, KBITS, KTERN, KQMAX,
                         VG, VNG, VNBG, VNB, VNBT, VPER, VPM, VMP, VBITS, VTERN, VQMAX)
    elif s < ns:
        _packed_part(q_ptr, cache_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, kperm_ptr, vperm_ptr, o_ptr, lse_ptr,
                     qscale, b, hk, s, ns, qrow, orow, lrow, gmask, stride_bt, stride_cp, stride_ct, stride_ch,
                     P, HAS_KPERM, HAS_VPERM, QGP, D, BN, DT, DOT_IEEE, K_OFF, V_OFF, KM_OFF, VM_OFF,
                     KG, KNG, KNBG, KNB, KNBT, KPER, KPM, KMP, KBITS, KTERN, KQMAX,
                     VG, VNG, VNBG, VNB, VNBT, VPER, VPM, VMP, VBITS, VTERN, VQMAX)
    else:
        _fp_part(q_ptr, fpk_ptr, fpv_ptr, nf_ptr, o_ptr, lse_ptr, qscale, b, hk, qrow, orow, lrow, gmask,
                 stride_fb, stride_ft, stride_fh, QGP, D, DP, FBN, DT, DOT_IEEE)


@triton.jit
def merge_kernel(o_ptr, lse_ptr, out_ptr, nparts, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                 stride_xb, stride_xh, D: tl.constexpr, DP: tl.constexpr, SP: tl.constexpr):
    """out[b, h] = sum_s w_s o[b, h, s] / sum_s w_s with w_s = exp(lse_s - max lse) (empty splits weigh 0).

    Grid (B, Hq). o [B, Hq, S, D] fp32, lse [B, Hq, S] fp32 (-inf = empty), out [B, Hq, D] (any float dtype).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    si = tl.arange(0, SP)
    smask = si < nparts
    d = tl.arange(0, DP)
    dmask = d < D
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + si, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    den = tl.sum(w, axis=0)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + si[:, None] * stride_os + d[None, :],
                mask=smask[:, None] & dmask[None, :] & (w > 0)[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * stride_xb + h * stride_xh + d, res.to(out_ptr.dtype.element_ty), mask=dmask)
