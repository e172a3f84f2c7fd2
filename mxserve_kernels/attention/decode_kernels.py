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
def _load_tile(cache_ptr, meta_ptr, bt_ptr, bt_row, pos, valid, P, stride_cp, stride_ct, head_off,
               K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
               KNB: tl.constexpr, KNBT: tl.constexpr, KMP: tl.constexpr, KNG: tl.constexpr,
               VNB: tl.constexpr, VNBT: tl.constexpr, VMP: tl.constexpr, VNG: tl.constexpr):
    """Raw packed tile of positions ``pos`` [BN]: K/V code bytes [BN, *NBT] uint8, K/V meta [BN, *MP] fp16."""
    page = tl.load(bt_ptr + bt_row + pos // P, mask=valid, other=0).to(tl.int64)
    base = page * stride_cp + (pos % P) * stride_ct + head_off  # int64 byte offset of each slot
    jk = tl.arange(0, KNBT)
    jv = tl.arange(0, VNBT)
    mk = tl.arange(0, KMP)
    mv = tl.arange(0, VMP)
    vm2 = valid[:, None]
    kb = tl.load(cache_ptr + base[:, None] + (K_OFF + jk)[None, :], mask=vm2 & (jk < KNB)[None, :], other=0)
    vb = tl.load(cache_ptr + base[:, None] + (V_OFF + jv)[None, :], mask=vm2 & (jv < VNB)[None, :], other=0)
    half = base >> 1
    km = tl.load(meta_ptr + half[:, None] + (KM_OFF // 2 + mk)[None, :], mask=vm2 & (mk < 2 * KNG)[None, :],
                 other=0.0)
    vmt = tl.load(meta_ptr + half[:, None] + (VM_OFF // 2 + mv)[None, :], mask=vm2 & (mv < 2 * VNG)[None, :],
                  other=0.0)
    return kb, vb, km, vmt


@triton.jit
def _dot(a, b, DT: tl.constexpr, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _packed_part(q_ptr, cache_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, kperm_ptr, vperm_ptr, o_ptr, lse_ptr,
                 qscale, b, hk, s, ns, qrow, orow, lrow, gmask, stride_bt, stride_cp, stride_ct, stride_ch, P,
                 HAS_KPERM: tl.constexpr, HAS_VPERM: tl.constexpr, QGP: tl.constexpr, D: tl.constexpr,
                 BN: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
                 K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
                 KG: tl.constexpr, KNG: tl.constexpr, KNBG: tl.constexpr, KNB: tl.constexpr, KNBT: tl.constexpr,
                 KPER: tl.constexpr, KPM: tl.constexpr, KMP: tl.constexpr, KBITS: tl.constexpr,
                 KTERN: tl.constexpr, KQMAX: tl.constexpr,
                 VG: tl.constexpr, VNG: tl.constexpr, VNBG: tl.constexpr, VNB: tl.constexpr, VNBT: tl.constexpr,
                 VPER: tl.constexpr, VPM: tl.constexpr, VMP: tl.constexpr, VBITS: tl.constexpr,
                 VTERN: tl.constexpr, VQMAX: tl.constexpr):
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
                        stride_qb, stride_qh, stride_bt, stride_cp, stride_ct, stride_ch, P,
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
                        VBITS: tl.constexpr, VTERN: tl.constexpr, VQMAX: tl.constexpr):
    """One (request b, kv head hk, split s) program; s == ns is the fp segment. Writes o[b, hq, s, :], lse[b, hq, s].

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
    if s < ns:
        _packed_part(q_ptr, cache_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, kperm_ptr, vperm_ptr, o_ptr, lse_ptr,
                     qscale, b, hk, s, ns, qrow, orow, lrow, gmask, stride_bt, stride_cp, stride_ct, stride_ch, P,
                     HAS_KPERM, HAS_VPERM, QGP, D, BN, DT, DOT_IEEE, K_OFF, V_OFF, KM_OFF, VM_OFF,
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
