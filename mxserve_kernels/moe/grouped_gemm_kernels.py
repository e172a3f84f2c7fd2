"""@triton.jit kernels of the mixed-precision grouped GEMM (runtime layout: ``_common/layout.py``).

One launch covers every expert of a projection whatever its scheme: each program owns one (m-block, n-block) tile,
reads its expert's ``einfo`` row and branches once, outside the K loop, to a K loop specialised (constexpr) for
that kind (bf16, int2/4/8, int3 = 2-bit plane + high-bit plane, nested int2 + 1..2 sign planes). Weights are
dequantized in registers (``q * scale + zero`` in fp32, the reference's expression) to the activation dtype and fed
to ``tl.dot`` with fp32 accumulation.

Modes (constexpr ``MODE``): 0 plain ``out[r] = x[r // a_div] @ W^T``; 1 gate_up with fused SiLU-and-mul
(``out[r] = silu(x W_gate^T) * (x W_up^T)``, gate rows ``[0, n_up)``, up rows ``[n_up, 2 n_up)``);
2 down with the router weight ``out[r] = topk_w[r] * (x[r] @ W^T)``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rep(t, R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K/R, BLOCK_N] -> [BLOCK_K, BLOCK_N], each row repeated R times (row j -> rows j*R .. j*R+R-1)."""
    return tl.reshape(tl.broadcast_to(t[:, None, :], (BLOCK_K // R, R, BLOCK_N)), (BLOCK_K, BLOCK_N))


@triton.jit
def _unpack(words, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """int32 words [BLOCK_K*BITS/32, BLOCK_N] -> codes [BLOCK_K, BLOCK_N] (code j of a word in bits [j*B, j*B+B))."""
    PER: tl.constexpr = 32 // BITS
    sh = tl.arange(0, PER) * BITS
    q = (words[:, None, :] >> sh[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def _dq_tile(qw_ptr, pw_ptr, meta_ptr, wbf_ptr, qoff, poff, moff, woff, g, wcols, K, k0, offs_n, n_mask,
             KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr, BLOCK_K: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """Dequantized weight tile, fp32 [BLOCK_K, BLOCK_N] (W^T rows k0.., columns offs_n). Codes, planes and
    metadata are loaded compactly (one int32 word / one scale per 32 rows) and expanded in registers, so each byte
    is read once. Requires BLOCK_K % 32 == 0 and K % 32 == 0 for integer kinds (G in {32, 64, 128})."""
    col = offs_n[None, :]
    if KIND == 1:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & n_mask[None, :]
        w = tl.load(wbf_ptr + woff + offs_k[:, None] * wcols + col, mask=mask, other=0.0).to(tl.float32)
    else:
        PER: tl.constexpr = 32 // BITS
        offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
        words = tl.load(qw_ptr + qoff + offs_w[:, None] * wcols + col,
                        mask=(offs_w < K // PER)[:, None] & n_mask[None, :], other=0)
        q = _unpack(words, BITS, BLOCK_K, BLOCK_N)
        offs_32 = k0 // 32 + tl.arange(0, BLOCK_K // 32)  # 32-row chunks: one group each (G % 32 == 0)
        m32 = (offs_32 < K // 32)[:, None] & n_mask[None, :]
        if KIND == 3:  # int3: high bit lives in a 1-bit plane
            hi = tl.load(pw_ptr + poff + offs_32[:, None] * wcols + col, mask=m32, other=0)
            q = q | (_unpack(hi, 1, BLOCK_K, BLOCK_N) << 2)
        k_groups = K // g
        gi = (offs_32 * 32 // g)[:, None]
        s = tl.load(meta_ptr + moff + gi * wcols + col, mask=m32, other=0.0).to(tl.float32)
        z = tl.load(meta_ptr + moff + (k_groups + gi) * wcols + col, mask=m32, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * _rep(s, 32, BLOCK_K, BLOCK_N) + _rep(z, 32, BLOCK_K, BLOCK_N)
        if KIND == 4:  # nested: + sum_p (2*bit_p - 1) * plane_scale_p
            for p in tl.static_range(NP):
                pb = tl.load(pw_ptr + poff + (p * (K // 32) + offs_32[:, None]) * wcols + col, mask=m32, other=0)
                sp = tl.load(meta_ptr + moff + ((2 + p) * k_groups + gi) * wcols + col, mask=m32,
                             other=0.0).to(tl.float32)
                sign = _unpack(pb, 1, BLOCK_K, BLOCK_N).to(tl.float32) * 2.0 - 1.0
                w = w + sign * _rep(sp, 32, BLOCK_K, BLOCK_N)
    return w


@triton.jit
def _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr, wbf_ptr,
                 qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                 KIND: tl.constexpr, BITS: tl.constexpr, NP: tl.constexpr, DUAL: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, IS_FP32: tl.constexpr):
    """acc (+acc2 for the up half when DUAL) += x[rows] @ dequant(W)^T over all of K; fp32 [BLOCK_M, BLOCK_N]."""
    offs_kb = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        k_mask = offs_k < K
        a = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = _dq_tile(qw_ptr, pw_ptr, meta_ptr, wbf_ptr, qoff, poff, moff, woff, g, wcols, K, k0, offs_n, n_mask,
                     KIND, BITS, NP, BLOCK_K, BLOCK_N).to(a.dtype)
        if IS_FP32:  # fp32 activations, or the CPU interpreter (whose bf16 tl.dot is wrong): exact fp32 dot
            a = a.to(tl.float32)
            acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if DUAL:
            w2 = _dq_tile(qw_ptr, pw_ptr, meta_ptr, wbf_ptr, qoff, poff, moff, woff, g, wcols, K, k0,
                          offs_n + n_up, n_mask, KIND, BITS, NP, BLOCK_K, BLOCK_N).to(a.dtype)
            if IS_FP32:
                acc2 = tl.dot(a, w2.to(tl.float32), acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(a, w2, acc2)
    return acc, acc2


@triton.jit
def grouped_gemm_kernel(x_ptr, out_ptr, qw_ptr, pw_ptr, meta_ptr, wbf_ptr, einfo_ptr,
                        sorted_ids_ptr, block_expert_ptr, num_post_ptr, topk_w_ptr,
                        N, K, wcols, n_up, stride_xm, stride_om, a_div, num_valid,
                        MODE: tl.constexpr, DENSE: tl.constexpr, NFIELDS: tl.constexpr, IS_FP32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (m-blocks, cdiv(N, BLOCK_N)). Rows of block b: ``sorted_ids[b*BLOCK_M:(b+1)*BLOCK_M]`` (ids >= num_valid
    are padding), expert ``block_expert[b]``; DENSE: rows ``b*BLOCK_M + arange`` and expert 0."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
    row_mask = (rows < num_valid) & live
    x_rows = tl.where(row_mask, rows // a_div, 0)
    info = einfo_ptr + e * NFIELDS
    kind = tl.where(live, tl.load(info + 0), 0)
    bits = tl.load(info + 1)
    g = tl.maximum(tl.load(info + 2).to(tl.int32), 1)
    qoff = tl.load(info + 3)
    poff = tl.load(info + 4)
    moff = tl.load(info + 5)
    woff = tl.load(info + 6)
    npl = tl.load(info + 7)
    DUAL: tl.constexpr = MODE == 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if kind == 2:
        if bits == 4:
            acc, acc2 = _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     wbf_ptr, qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                                     2, 4, 0, DUAL, BLOCK_K, BLOCK_N, IS_FP32)
        elif bits == 2:
            acc, acc2 = _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     wbf_ptr, qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                                     2, 2, 0, DUAL, BLOCK_K, BLOCK_N, IS_FP32)
        else:
            acc, acc2 = _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     wbf_ptr, qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                                     2, 8, 0, DUAL, BLOCK_K, BLOCK_N, IS_FP32)
    elif kind == 3:
        acc, acc2 = _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                 wbf_ptr, qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                                 3, 2, 1, DUAL, BLOCK_K, BLOCK_N, IS_FP32)
    elif kind == 4:
        if npl == 1:
            acc, acc2 = _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     wbf_ptr, qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                                     4, 2, 1, DUAL, BLOCK_K, BLOCK_N, IS_FP32)
        else:
            acc, acc2 = _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                     wbf_ptr, qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                                     4, 2, 2, DUAL, BLOCK_K, BLOCK_N, IS_FP32)
    elif kind == 1:
        acc, acc2 = _expert_loop(acc, acc2, x_ptr, x_rows, row_mask, stride_xm, qw_ptr, pw_ptr, meta_ptr,
                                 wbf_ptr, qoff, poff, moff, woff, g, wcols, n_up, K, offs_n, n_mask,
                                 1, 16, 0, DUAL, BLOCK_K, BLOCK_N, IS_FP32)
    if MODE == 1:
        res = acc / (1.0 + tl.exp(-acc)) * acc2
    elif MODE == 2:
        tw = tl.load(topk_w_ptr + x_rows, mask=row_mask, other=0.0).to(tl.float32)
        res = acc * tw[:, None]
    else:
        res = acc
    out_rows = tl.where(row_mask, rows, 0)
    tl.store(out_ptr + out_rows[:, None] * stride_om + offs_n[None, :], res.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])
