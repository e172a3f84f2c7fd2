"""@triton.jit kernels: split-K paged decode attention over packed K/V slots plus a full-precision token segment.

Grid (B, H_kv, NS + 1). Programs s < NS each take a contiguous chunk of the request's packed positions
[pk_lo, pk_hi) (flash-decoding split); program s == NS attends the request's fp tokens (sinks, recent window,
current token). Every program writes a normalised partial output and its log-sum-exp; ``decode.py`` merges them.
All q heads of one kv head are one tile (GQA): each page is read once per kv head.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pow3(e):
    return tl.where(e == 0, 1, tl.where(e == 1, 3, tl.where(e == 2, 9, tl.where(e == 3, 27, 81))))


@triton.jit
def dequant_tile(cache_ptr, meta_ptr, base, valid, d, dmask, CODE_OFF: tl.constexpr, META_OFF: tl.constexpr,
                 G: tl.constexpr, PER: tl.constexpr, NB: tl.constexpr, BITS: tl.constexpr, TERN: tl.constexpr,
                 QMAX: tl.constexpr):
    """Dequantize a [BN, DP] tile (slot channel order) from slots at byte offsets ``base`` [BN]. Returns fp32."""
    grp = d // G
    w = d % G
    m = valid[:, None] & dmask[None, :]
    byte = tl.load(cache_ptr + base[:, None] + CODE_OFF + (grp * NB + w // PER)[None, :], mask=m, other=0)
    byte = byte.to(tl.int32)
    sub = (w % PER)[None, :]
    if TERN:
        code = (byte // _pow3(sub)) % 3
    else:
        code = (byte >> (sub * BITS)) & QMAX
    mbase = (base[:, None] + META_OFF) // 2 + (grp * 2)[None, :]
    scale = tl.load(meta_ptr + mbase, mask=m, other=0.0).to(tl.float32)
    zero = tl.load(meta_ptr + mbase + 1, mask=m, other=0.0).to(tl.float32)
    return code.to(tl.float32) * scale + zero


@triton.jit
def paged_decode_kernel(q_ptr, cache_ptr, meta_ptr, bt_ptr, lo_ptr, hi_ptr, fpk_ptr, fpv_ptr, nf_ptr,
                        kperm_ptr, vperm_ptr, o_ptr, lse_ptr, sm_scale,
                        stride_qb, stride_qh, stride_bt, stride_cp, stride_ct, stride_ch, P,
                        stride_fb, stride_ft, stride_fh, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                        HAS_KPERM: tl.constexpr, HAS_VPERM: tl.constexpr,
                        QG: tl.constexpr, QGP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        NS: tl.constexpr, BN: tl.constexpr, DOT_IEEE: tl.constexpr,
                        K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
                        KG: tl.constexpr, KPER: tl.constexpr, KNB: tl.constexpr, KBITS: tl.constexpr,
                        KTERN: tl.constexpr, KQMAX: tl.constexpr,
                        VG: tl.constexpr, VPER: tl.constexpr, VNB: tl.constexpr, VBITS: tl.constexpr,
                        VTERN: tl.constexpr, VQMAX: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    g = tl.arange(0, QGP)
    gmask = g < QG
    d = tl.arange(0, DP)
    dmask = d < D
    hq = hk * QG + g
    packed = s < NS
    # q in slot order for packed K (gather through kperm), in natural order for the fp segment
    qd = d
    if HAS_KPERM:
        qd = tl.where(packed, tl.load(kperm_ptr + hk * D + d, mask=dmask, other=0), d)
    q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + qd[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    qdt = q.dtype
    q = q.to(tl.float32) * sm_scale
    m_i = tl.full([QGP], float("-inf"), tl.float32)
    l_i = tl.zeros([QGP], tl.float32)
    acc = tl.zeros([QGP, DP], tl.float32)
    n_offs = tl.arange(0, BN)
    lo = tl.load(lo_ptr + b).to(tl.int32)
    hi = tl.load(hi_ptr + b).to(tl.int32)
    nf = tl.load(nf_ptr + b).to(tl.int32)
    per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NS), BN) * BN
    start = tl.where(packed, lo + s * per, 0)
    end = tl.where(packed, tl.minimum(lo + s * per + per, hi), nf)
    for n0 in range(start, end, BN):
        pos = n0 + n_offs
        valid = pos < end
        if packed:
            page = tl.load(bt_ptr + b * stride_bt + pos // P, mask=valid, other=0).to(tl.int64)
            base = page * stride_cp + (pos % P) * stride_ct + hk * stride_ch
            k = dequant_tile(cache_ptr, meta_ptr, base, valid, d, dmask, K_OFF, KM_OFF,
                             KG, KPER, KNB, KBITS, KTERN, KQMAX)
            v = dequant_tile(cache_ptr, meta_ptr, base, valid, d, dmask, V_OFF, VM_OFF,
                             VG, VPER, VNB, VBITS, VTERN, VQMAX)
        else:
            fo = b * stride_fb + pos[:, None] * stride_ft + hk * stride_fh + d[None, :]
            fm = valid[:, None] & dmask[None, :]
            k = tl.load(fpk_ptr + fo, mask=fm, other=0.0).to(tl.float32)
            v = tl.load(fpv_ptr + fo, mask=fm, other=0.0).to(tl.float32)
        if DOT_IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q.to(qdt), tl.trans(k.to(qdt)))
        sc = tl.where(valid[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(qdt), v.to(qdt))
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    # packed V is in slot order: scatter back through vperm
    od = d
    if HAS_VPERM:
        od = tl.where(packed, tl.load(vperm_ptr + hk * D + d, mask=dmask, other=0), d)
    tl.store(o_ptr + b * stride_ob + hq[:, None] * stride_oh + s * stride_os + od[None, :], out,
             mask=gmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + b * stride_lb + hq * stride_lh + s, lse, mask=gmask)
