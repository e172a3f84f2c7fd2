"""Gluon prototype of the int4 decode MoE GEMM (down projection) for sm90: the weights as wgmma's register A operand
in a slot-major K order, so that the dequantized code slots already sit in the A fragment (no data movement).

Orientation (SWAP, as ``grouped_gemm_kernels._int_loop(SWAP)``): ``acc^T[BN, BM] += W[BN, K] x^T[K, BM]``, BN = 64
weight rows (output features) per warp group (wgmma M), BM = 16 routed tokens (wgmma N), one step = 16 code words =
128 K rows (wgmma K = 128: 8 ``wgmma.m64n16k16`` issued back to back, ONE ``wgmma.wait_group`` per step).

The layout argument. The wgmma register A fragment (``DotOperandLayout(0, NVMMA v3, k_width=2)`` of a ``[64, 128]``
bf16 tile) is the linear layout (``gl.to_linear_layout``, Triton 3.6)::

    reg  [k1, n8, k8, k16, k32, k64]   lane [k2, k4, n1, n2, n4]   warp [n16, n32]

i.e. in k-block ``kb`` a thread (lane = 4*g + t) holds rows {g, g+8} (+16*warp) and k columns
{16kb + 2t, 2t+1, 2t+8, 2t+9}. Order the step's K rows SLOT-MAJOR: logical ``k = 16*j + w`` is code slot ``j`` of
word ``w`` (K row ``8*(w0 + w) + j``). Then for ``kb = j`` the thread holds exactly slot j of words
{2t, 2t+1, 2t+8, 2t+9} of its two rows: loading those 4 words per row in the ``[BN, 16]`` word layout
``WORD_LAYOUT`` (reg [w1, n8, w8], lane [w2, w4, n1, n2, n4], warp [n16, n32]) and dequantizing all 8 slots of each
(``grouped_gemm_kernels._dq4_asm``, the packed-bf16 PTX of ``_dq4_bf16x2``) gives 8 ``[BN, 16]`` tensors whose
``join``/``permute``/``reshape`` into ``[BN, 128]`` is the A layout up to a register renaming; the kernel checks this
with ``gl.convert_layout(..., assert_trivial=True)`` (a compile error otherwise).

The activations are loaded in the matching permuted K order (row ``k`` of the B tile is x column
``8*(w0 + k % 16) + k // 16``) ONCE per program for the whole K range into shared memory ``[K/128, 128, BM]`` (K is
a constexpr: the down projection's I, 768 for Qwen3-30B-A3B = 24 KB at BM 16), so the K loop has no barrier at all;
the next step's code words and scale/zero are loaded (plain ``ld.global`` into registers) before the current step's
dequant + wgmma (a register double buffer).

Limits (the launcher checks them): plain int4 experts only (``layout.KIND_INT``, bits 4), group size 128 (one
scale/zero per row per step: loaded as ``[BN]`` vectors), N % 64 == 0, K % 128 == 0, bf16 activations, MODE 2
(down: the router weight applied); BM 16, 4 warps.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from mxserve_kernels._common.layout import F_KIND, F_MOFF, F_QOFF, KIND_INT, OFF_UNIT
from mxserve_kernels.moe.grouped_gemm_kernels import _dq4_asm

BN = gl.constexpr(64)  # weight rows per program (wgmma M of one warp group)
BM = gl.constexpr(16)  # routed tokens per program (wgmma N; the route's BLOCK_M)
STEP_WORDS = gl.constexpr(16)  # code words per step
STEP_K = gl.constexpr(128)  # K rows per step (STEP_WORDS x 8 slots)

_DQ4 = gl.constexpr(_dq4_asm())
_F_KIND, _F_QOFF, _F_MOFF = gl.constexpr(F_KIND), gl.constexpr(F_QOFF), gl.constexpr(F_MOFF)
_KIND_INT, _OFF_UNIT = gl.constexpr(KIND_INT), gl.constexpr(OFF_UNIT)
_BF16X8 = gl.constexpr((gl.bfloat16,) * 8)

# accumulator acc^T [BN, BM]: one warp group, wgmma m64n16k16
ACC_LAYOUT = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BM.value, 16]))
# the register A operand [BN, 128] (bf16, 2 per 32-bit register)
A_LAYOUT = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=ACC_LAYOUT.value, k_width=2))
# code words [BN, 16]: thread (lane 4g + t, warp v) holds words {2t, 2t+1, 2t+8, 2t+9} of rows {g, g+8} + 16 v
WORD_LAYOUT = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1], [8, 0], [0, 8]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
    warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[BN.value, STEP_WORDS.value]))
ROW_LAYOUT = gl.constexpr(gl.SliceLayout(1, WORD_LAYOUT.value))  # [BN] per-row vectors (scale, zero)
# activation staging tile [128, BM] (k, token), 128 threads
X_LAYOUT = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 2], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                         order=[1, 0]))
X_SMEM = gl.constexpr(gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2))
# epilogue [BN, BM] (n, token): n is contiguous in ``out``
OUT_LAYOUT = gl.constexpr(gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[8, 4], warps_per_cta=[1, 4],
                                           order=[0, 1]))


@gluon.jit
def _load_step(qw_ptr, meta_ptr, qoff, moff, wcols, kgn, step, n_w, w_w, n_r):
    """Code words ``[BN, 16]`` (WORD_LAYOUT) of word rows ``16*step ..`` and the step's scale / zero ``[BN]``
    (ROW_LAYOUT; group ``step`` at g128) of one expert, columns ``n_w`` / ``n_r``."""
    words = gl.load(qw_ptr + qoff + (step * STEP_WORDS + w_w)[None, :] * wcols + n_w[:, None])
    s = gl.load(meta_ptr + moff + step * wcols + n_r)
    z = gl.load(meta_ptr + moff + kgn + step * wcols + n_r)
    return words, s, z


@gluon.jit
def _a_tile(words, s, z):
    """The ``[BN, 128]`` bf16 A operand (slot-major K: ``k = 16*j + w``) of one step: the 8 slots of every word
    by the packed-bf16 PTX, joined into K without data movement (asserted: a compile error for a word layout that
    is not ``WORD_LAYOUT`` up to register order).

    Args:
        words: int32 [BN, 16] code words (any layout; the kernel's is WORD_LAYOUT). s, z: [BN] scale / zero in
            ``SliceLayout(1, words' layout)``.
    Returns:
        bf16 [BN, 128] in A_LAYOUT."""
    sb = s.to(gl.bfloat16)[:, None].broadcast_to([BN, STEP_WORDS])
    zb = z.to(gl.bfloat16)[:, None].broadcast_to([BN, STEP_WORDS])
    q0, q1, q2, q3, q4, q5, q6, q7 = gl.inline_asm_elementwise(
        asm=_DQ4, constraints="=h," * 8 + "r,h,h", args=[words, sb, zb], dtype=_BF16X8, is_pure=True, pack=1)
    # join: the new (last) dimension is slot bit 0, then bit 1, then bit 2
    p = gl.join(gl.join(gl.join(q0, q1), gl.join(q2, q3)), gl.join(gl.join(q4, q5), gl.join(q6, q7)))
    p = gl.permute(p, (0, 4, 3, 2, 1))  # [BN, j2, j1, j0, w]
    a = gl.reshape(p, [BN, STEP_K])  # k = 64 j2 + 32 j1 + 16 j0 + w = 16 j + w
    return gl.convert_layout(a, A_LAYOUT, assert_trivial=True)


@gluon.jit
def _stage_x(x_ptr, x_rows, row_mask, stride_xm, x_smem, K: gl.constexpr):
    """Activations of the program's BM rows, all K, into shared ``[K/128, 128, BM]`` in the slot-major order of
    each step (B tile row k of step s = x column ``128 s + 8 (k % 16) + k // 16``); rows past the route: zeros."""
    k = gl.arange(0, STEP_K, layout=gl.SliceLayout(1, X_LAYOUT))
    col = (k % STEP_WORDS) * 8 + k // STEP_WORDS
    m = gl.arange(0, BM, layout=gl.SliceLayout(0, X_LAYOUT))
    xr = gl.convert_layout(x_rows, gl.SliceLayout(0, X_LAYOUT))
    rm = gl.convert_layout(row_mask, gl.SliceLayout(0, X_LAYOUT))
    base = x_ptr + xr.to(gl.int64)[None, :] * stride_xm + col[:, None]
    mask = rm[None, :] & (m >= 0)[None, :]
    for s in gl.static_range(K // STEP_K):
        x_smem.index(s).store(gl.load(base + s * STEP_K, mask=mask, other=0.0))


@gluon.jit(do_not_specialize=["num_valid"])
def gluon_w4_down_kernel(x_ptr, out_ptr, qw_ptr, meta_ptr, einfo_ptr, sorted_ids_ptr, block_expert_ptr, num_post_ptr,
                         topk_w_ptr, N, stride_xm, stride_om, num_valid, K: gl.constexpr, NFIELDS: gl.constexpr):
    """Grid (m-blocks of the route, N / 64): ``out[r, n] = topk_w[r] * sum_k W_e[n, k] x[r, k]`` for the BM = 16
    pair rows r of m-block ``pid_m`` (``sorted_ids``; ids >= num_valid are padding) and expert
    ``e = block_expert[pid_m]``; blocks past ``num_post``, with e < 0 or an expert without weights store nothing
    (the launcher zero-fills ``out``).

    Args:
        x_ptr: bf16 [T*K, K] activations (pair rows). out_ptr: bf16 [T*K, N]. qw_ptr / meta_ptr / einfo_ptr: the
            projection in the runtime layout (``_common/layout.py``; every live expert int4 g128).
        sorted_ids_ptr / block_expert_ptr / num_post_ptr: the route (``routing.Route``, BLOCK_M 16).
        topk_w_ptr: fp32 [T*K] router weights. N: output features (wcols of the layout). K: reduction length.
    """
    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    num_post = gl.load(num_post_ptr)
    e = gl.load(block_expert_ptr + pid_m)
    info = einfo_ptr + gl.maximum(e, 0) * NFIELDS
    kind = gl.load(info + _F_KIND)  # an expert without weights (KIND_NONE) leaves its rows 0
    if (pid_m * BM < num_post) & (e >= 0) & (kind == _KIND_INT):
        qoff = gl.load(info + _F_QOFF) * _OFF_UNIT
        moff = gl.load(info + _F_MOFF) * _OFF_UNIT
        kgn = (K // STEP_K) * N  # scale rows [K/G, N], then zero rows (g = 128)
        n_w = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, WORD_LAYOUT))
        w_w = gl.arange(0, STEP_WORDS, layout=gl.SliceLayout(0, WORD_LAYOUT))
        n_r = pid_n * BN + gl.arange(0, BN, layout=ROW_LAYOUT)
        words, s, z = _load_step(qw_ptr, meta_ptr, qoff, moff, N, kgn, 0, n_w, w_w, n_r)

        NSTEPS: gl.constexpr = K // STEP_K
        rows = gl.load(sorted_ids_ptr + pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, ACC_LAYOUT)))
        row_mask = rows < num_valid
        x_rows = gl.where(row_mask, rows, 0)
        x_smem = gl.allocate_shared_memory(gl.bfloat16, [NSTEPS, STEP_K, BM], X_SMEM)
        _stage_x(x_ptr, x_rows, row_mask, stride_xm, x_smem, K)
        fence_async_shared()
        gl.thread_barrier()

        acc = gl.zeros([BN, BM], gl.float32, layout=ACC_LAYOUT)
        a = _a_tile(words, s, z)
        words, s, z = _load_step(qw_ptr, meta_ptr, qoff, moff, N, kgn, 1 % NSTEPS, n_w, w_w, n_r)
        for step in range(NSTEPS):
            # step's wgmmas (async), then the next step's dequant and the loads two steps ahead while they run;
            # ONE wait per step, keeping this step's A registers alive until it (deps)
            acc = warpgroup_mma(a, x_smem.index(step), acc, is_async=True)
            a_next = _a_tile(words, s, z)
            words, s, z = _load_step(qw_ptr, meta_ptr, qoff, moff, N, kgn, gl.minimum(step + 2, NSTEPS - 1), n_w,
                                     w_w, n_r)  # past the end: reload the last step (unused)
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=[acc, a])
            a = a_next

        tw = gl.load(topk_w_ptr + x_rows, mask=row_mask, other=0.0)
        res = gl.convert_layout((acc * tw[None, :]).to(gl.bfloat16), OUT_LAYOUT)
        m_o = gl.convert_layout(x_rows, gl.SliceLayout(0, OUT_LAYOUT))
        mk_o = gl.convert_layout(row_mask, gl.SliceLayout(0, OUT_LAYOUT))
        n_o = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT_LAYOUT))
        gl.store(out_ptr + m_o.to(gl.int64)[None, :] * stride_om + n_o[:, None], res,
                 mask=mk_o[None, :] & (n_o < N)[:, None])
