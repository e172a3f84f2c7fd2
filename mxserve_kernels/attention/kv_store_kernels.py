"""@triton.jit kernels: quantize-and-store new K/V tokens into packed page slots (layout: ``kv_format.py``).

Bit-exact with ``reference.quantize_slots``: fp32 math, precise division (``div_rn``), round-half-up
(``floor(y + 0.5)``), fp16 scale/zero rounded before the codes are computed.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _quant_one(x_ptr, perm_ptr, has_perm: tl.constexpr, h, code_ptr, meta_ptr, clip,
               D: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, NGP: tl.constexpr,
               PER: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, PERP: tl.constexpr,
               BITS: tl.constexpr, TERN: tl.constexpr, QMAX: tl.constexpr):
    """Quantize one token-head vector of D channels (K or V) and write codes + fp16 meta.

    Tile [NGP, NBP, PERP]: (group g, byte j of the group, code i of the byte) <-> slot channel g*G + j*PER + i.
    """
    g = tl.arange(0, NGP)[:, None, None]
    j = tl.arange(0, NBP)[None, :, None]
    i = tl.arange(0, PERP)[None, None, :]
    within = j * PER + i
    valid = (g < NG) & (j < NB) & (i < PER) & (within < G)
    ch = g * G + within                                   # slot-order channel
    if has_perm:
        src = tl.load(perm_ptr + h * D + ch, mask=valid, other=0)
    else:
        src = ch
    x = tl.load(x_ptr + src, mask=valid, other=0.0).to(tl.float32)
    mn = tl.min(tl.min(tl.where(valid, x, float("inf")), axis=2), axis=1)     # [NGP]
    mx = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=2), axis=1)
    lo = mn * clip
    hi = mx * clip
    scale = tl.maximum(tl.math.div_rn(hi - lo, QMAX * 1.0), 1e-8).to(tl.float16)
    zero = lo.to(tl.float16)
    gm = tl.arange(0, NGP) < NG
    tl.store(meta_ptr + tl.arange(0, NGP) * 2, scale, mask=gm)
    tl.store(meta_ptr + tl.arange(0, NGP) * 2 + 1, zero, mask=gm)
    s3 = scale.to(tl.float32)[:, None, None]
    z3 = zero.to(tl.float32)[:, None, None]
    q = tl.floor(tl.math.div_rn(x - z3, s3) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32)
    q = tl.where(valid, q, 0)
    if TERN:
        w = tl.where(i == 0, 1, tl.where(i == 1, 3, tl.where(i == 2, 9, tl.where(i == 3, 27, 81))))
    else:
        w = 1 << (i * BITS)
    byte = tl.sum(q * w, axis=2)                            # [NGP, NBP]
    gb = tl.arange(0, NGP)[:, None]
    jb = tl.arange(0, NBP)[None, :]
    tl.store(code_ptr + gb * NB + jb, byte.to(tl.uint8), mask=(gb < NG) & (jb < NB))


@triton.jit
def kv_store_kernel(k_ptr, v_ptr, slot_ptr, cache_ptr, meta_ptr, kperm_ptr, vperm_ptr, k_clip, v_clip,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_cp, stride_ct, stride_ch, P,
                    HAS_KPERM: tl.constexpr, HAS_VPERM: tl.constexpr, D: tl.constexpr,
                    K_OFF: tl.constexpr, V_OFF: tl.constexpr, KM_OFF: tl.constexpr, VM_OFF: tl.constexpr,
                    KG: tl.constexpr, KNG: tl.constexpr, KNGP: tl.constexpr, KPER: tl.constexpr,
                    KNB: tl.constexpr, KNBP: tl.constexpr, KPERP: tl.constexpr, KBITS: tl.constexpr,
                    KTERN: tl.constexpr, KQMAX: tl.constexpr,
                    VG: tl.constexpr, VNG: tl.constexpr, VNGP: tl.constexpr, VPER: tl.constexpr,
                    VNB: tl.constexpr, VNBP: tl.constexpr, VPERP: tl.constexpr, VBITS: tl.constexpr,
                    VTERN: tl.constexpr, VQMAX: tl.constexpr):
    """Grid (T, H): quantize token t / kv head h into its slot; slot_mapping < 0 is skipped.

    cache_ptr: uint8 cache [pages, P, H, slot_bytes]; meta_ptr: the same storage viewed as fp16 (byte strides / 2).
    """
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        page = slot // P
        off = slot % P
        base = page * stride_cp + off * stride_ct + h * stride_ch       # bytes
        _quant_one(k_ptr + t * stride_kt + h * stride_kh, kperm_ptr, HAS_KPERM, h,
                   cache_ptr + base + K_OFF, meta_ptr + (base + KM_OFF) // 2, k_clip,
                   D, KG, KNG, KNGP, KPER, KNB, KNBP, KPERP, KBITS, KTERN, KQMAX)
        _quant_one(v_ptr + t * stride_vt + h * stride_vh, vperm_ptr, HAS_VPERM, h,
                   cache_ptr + base + V_OFF, meta_ptr + (base + VM_OFF) // 2, v_clip,
                   D, VG, VNG, VNGP, VPER, VNB, VNBP, VPERP, VBITS, VTERN, VQMAX)
