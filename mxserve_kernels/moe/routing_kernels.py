"""@triton.jit routing kernel: the whole tile map of a small batch (decode) in ONE single-program launch.

Replaces the ~25 small torch ops of ``routing.moe_align_torch`` (each a separate launch, ~2-4 us apiece even inside a
CUDA graph) when ``T*K <= MAX_PAIRS``. Same output as the torch path, bit for bit: pairs grouped by expert in
increasing pair id (a stable sort on ``expert * PAIRS + pair``), each expert's run padded to a multiple of BLOCK_M
with the sentinel ``T*K``, ``block_expert`` = -1 past ``num_post``.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_PAIRS = 1024  # one program sorts up to this many (token, slot) pairs; larger batches use the torch path


@triton.jit(do_not_specialize=["num_pairs", "max_rows", "nblocks"])  # T-dependent: one binary for all T
def moe_align_kernel(ids_ptr, emap_ptr, sorted_ptr, bexp_ptr, npost_ptr, scratch_ptr,
                     num_pairs, num_experts, max_rows, nblocks,
                     HAS_MAP: tl.constexpr, PAIRS: tl.constexpr, E_P2: tl.constexpr, BLOCK_M: tl.constexpr,
                     FILL: tl.constexpr, BB: tl.constexpr):
    """Grid (1,). ids [num_pairs] (any int dtype), emap [E_global] or dummy, sorted [max_rows] int32,
    bexp [nblocks] int32, npost [1] int32, scratch [E_P2] int32. PAIRS >= num_pairs and E_P2 > num_experts are
    powers of two (bin E_P2 - 1 collects dropped pairs and lanes past num_pairs)."""
    offs = tl.arange(0, PAIRS)
    pm = offs < num_pairs
    e = tl.load(ids_ptr + offs, mask=pm, other=0).to(tl.int32)
    if HAS_MAP:
        e = tl.load(emap_ptr + e, mask=pm, other=-1).to(tl.int32)
    valid = pm & (e >= 0) & (e < num_experts)
    e = tl.where(valid, e, E_P2 - 1)
    counts = tl.histogram(e, E_P2)
    eo = tl.arange(0, E_P2)
    real = eo < num_experts
    counts = tl.where(real, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, 0)
    cend = tl.cumsum(counts, 0)
    # destination of the pair at sorted position p with expert x: pstart[x] + (p - cstart[x])
    tl.store(scratch_ptr + eo, (pend - padded) - (cend - counts))
    num_post = tl.sum(padded, 0)
    tl.store(npost_ptr, num_post)
    for r0 in range(0, max_rows, FILL):
        r = r0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + r, tl.zeros((FILL,), tl.int32) + num_pairs, mask=r < max_rows)
    tl.debug_barrier()  # scratch and the sentinel fill visible to every thread of the program
    sk = tl.sort(e * PAIRS + offs)
    se = sk // PAIRS
    sid = sk % PAIRS
    keep = se < num_experts
    delta = tl.load(scratch_ptr + se, mask=keep, other=0)
    tl.store(sorted_ptr + delta + offs, sid, mask=keep)
    for b0 in range(0, nblocks, BB):
        b = b0 + tl.arange(0, BB)
        start = b * BLOCK_M
        ex = tl.sum(((pend[None, :] <= start[:, None]) & real[None, :]).to(tl.int32), axis=1)
        tl.store(bexp_ptr + b, tl.where(start < num_post, ex, -1), mask=b < nblocks)
