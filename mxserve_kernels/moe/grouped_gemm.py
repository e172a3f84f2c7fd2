"""Launcher of the mixed-precision grouped GEMM, registered as the torch custom op ``mxserve::grouped_gemm``.

Contract: (1) check shapes/dtypes -> ValueError naming the tensor; (2) allocate the output; (3) launch one Triton
kernel for all experts of the projection (``grouped_gemm_kernels.grouped_gemm_kernel``).
"""
from __future__ import annotations

import os

import torch

from mxserve_kernels._common.fit import launch_fitting
from mxserve_kernels._common.layout import (F_BITS, F_KIND, F_WOFF, KIND_BF16, KIND_NONE, NFIELDS, OFF_UNIT,
                                            PackedWeights)
from mxserve_kernels.moe.routing import Route

try:  # importable without Triton; the op then raises a clear error when called
    import triton

    from mxserve_kernels.moe import grouped_gemm_kernels as _kernels  # attribute lookup at launch: tests may reload
    HAS_TRITON = True
except Exception:  # pragma: no cover - environment without triton
    HAS_TRITON = False

MODE_PLAIN, MODE_GATE_UP, MODE_DOWN = 0, 1, 2
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_usable(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``t``'s device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


@torch.library.custom_op("mxserve::grouped_gemm", mutates_args=())
def grouped_gemm_op(x: torch.Tensor, qw: torch.Tensor, pw: torch.Tensor, meta: torch.Tensor, wbf: torch.Tensor,
                    einfo: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                    num_post: torch.Tensor, topk_w: torch.Tensor, n: int, k: int, wcols: int, n_up: int, a_div: int,
                    num_valid: int, out_rows: int, mode: int, dense: bool, zero_init: bool,
                    cfg: list[int], kinds: int = 255) -> torch.Tensor:
    """Raw op (tensors and ints only, for torch.compile / CUDA graphs); use ``grouped_gemm`` instead."""
    if not HAS_TRITON:
        raise RuntimeError("mxserve::grouped_gemm needs Triton; use mxserve_kernels.moe.reference on this machine")
    k_split, splits = _split_k(k, cfg[6] if len(cfg) > 6 else 1)
    alloc = torch.zeros if zero_init else torch.empty
    out = alloc((out_rows, n), dtype=x.dtype, device=x.device)
    # split-K: fp32 partials [splits, rows, n (x2 for gate|up)], then one reduce launch (activation after the sum)
    dst = out if splits == 1 else alloc((splits, out_rows, 2 * n if mode == 1 else n), dtype=torch.float32,
                                        device=x.device)

    def launch(c: list[int]) -> None:
        block_m, block_n, block_k, num_warps, num_stages = c[:5]
        swap = bool(c[9]) if len(c) > 9 else False
        fma, kt = (bool(c[5]) if len(c) > 5 else False), (bool(c[7]) if len(c) > 7 else False)
        m_blocks = triton.cdiv(num_valid, block_m) if dense else block_expert.numel()
        grid = (m_blocks, triton.cdiv(n, block_n), splits)
        _kernels.grouped_gemm_kernel[grid](
            x, dst, qw, pw, meta, wbf, einfo, sorted_ids, block_expert, num_post, topk_w,
            n, k, wcols, n_up, x.stride(0), dst.stride(-2), a_div, num_valid, k_split, dst.stride(0),
            MODE=mode, DENSE=dense, NFIELDS=NFIELDS, IS_FP32=x.dtype == torch.float32 or not x.is_cuda, KINDS=kinds,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FMA=fma, SPLIT_K=splits, KT=kt,
            ASM=bool(c[8]) if len(c) > 8 else False, SWAP=swap,
            GSCALE=(int(c[10]) if len(c) > 10 else 0) if swap and not fma and not kt else 0,
            num_warps=num_warps, num_stages=num_stages)

    launch_fitting(launch, list(cfg), ("grouped_gemm", mode, dense, kinds, n, k, x.dtype, x.device.index),
                   smaller_configs)
    if splits > 1 and out.numel():
        block = 1024
        _kernels.splitk_reduce_kernel[(triton.cdiv(out.numel(), block),)](
            dst, out, out.numel(), n, dst.stride(0), SPLITS=splits, MODE=mode, BLOCK=block, num_warps=4)
    return out


def smaller_configs(cfg: list[int]) -> list[list[int]]:
    """Configs tried in order when ``cfg`` (a ``_cfg_list``) needs more shared memory than the device has: fewer
    pipeline stages; then (SWAP configs) the per-slot loop without SWAP / GSCALE at the original stages and fewer;
    then BLOCK_N halved down to 16 (no SWAP). BLOCK_M (the route's tiles), BLOCK_K, warps and SPLIT_K stay."""
    base = list(cfg)
    stages = base[4]
    out = [base[:4] + [s] + base[5:] for s in range(stages - 1, 0, -1)]
    plain = base[:9] + [0, 0] if len(base) > 9 and base[9] else base
    if plain is not base:
        out += [plain[:4] + [s] + plain[5:] for s in range(stages, 0, -1)]
    bn = base[1] // 2
    while bn >= 16:
        out += [plain[:1] + [bn] + plain[2:4] + [s] + plain[5:] for s in range(stages, 0, -1)]
        bn //= 2
    return out


def _split_k(k: int, split: int) -> tuple[int, int]:
    """(K rows per split, number of splits): the requested split of K into ranges of whole multiples of 32 rows
    (every code width packs a whole number of rows into 32 bits), never more splits than ranges."""
    if split <= 1:
        return k, 1
    k_split = triton.cdiv(triton.cdiv(k, split), 32) * 32
    return k_split, triton.cdiv(k, k_split)


@grouped_gemm_op.register_fake
def _(x, qw, pw, meta, wbf, einfo, sorted_ids, block_expert, num_post, topk_w, n, k, wcols, n_up, a_div,
      num_valid, out_rows, mode, dense, zero_init, cfg, kinds=255):
    return x.new_empty((out_rows, n))


# plain int widths whose SWAP loop may apply scale/zero per group -> kind_bit. Not int2: a SWAP step is >= 16 word
# rows (a dot's K >= 16) = 256 2-bit rows, longer than any group size the format allows (32/64/128).
GSCALE_KINDS = {4: 8}


def gscale_step_rows(bits: int, block_k: int) -> int:
    """K rows of one SWAP step of a ``bits``-wide plain int expert (``_int_loop``'s BKW words x 32/bits rows; BKW
    is BLOCK_K for 4-bit and max(16, BLOCK_K*bits/4) below: a dot needs K >= 16 word rows)."""
    bkw = block_k if bits >= 4 else max(16, block_k * bits // 4)
    return bkw * (32 // bits)


def _int_groups(w: PackedWeights) -> dict[int, int] | None:
    """{bits: gcd of the group sizes of the plain int experts of that width} for ``GSCALE_KINDS``, as computed when
    ``w`` was built (``PackedWeights._int_group_gcd``); None where einfo was not read (explicit ``kinds``, fake
    tensors)."""
    gcd = getattr(w, "_int_group_gcd", None)
    return None if gcd is None else {b: g for b, g in gcd.items() if b in GSCALE_KINDS}


def gscale_mask(w: PackedWeights | None, cfg: dict[str, int]) -> int:
    """The kernel's GSCALE mask for ``cfg`` on ``w``: ``kind_bit`` of each ``GSCALE_KINDS`` kind present whose
    every expert's group size is a multiple of the SWAP step (``gscale_step_rows``) and whose split-K ranges start
    on a step; 0 without ``"GSCALE": 1`` + ``"SWAP": 1`` (FMA / KT configs ignore it). Kinds that fail the check
    (and every other kind) keep the per-element SWAP loop in the same launch. ``w`` None (a key model): all of
    ``GSCALE_KINDS``."""
    if not cfg.get("GSCALE") or not cfg.get("SWAP") or cfg.get("FMA") or cfg.get("KT"):
        return 0
    if w is None:
        return sum(GSCALE_KINDS.values())
    groups = _int_groups(w)
    if not groups:
        return 0
    k_split = _split_k(w.k, int(cfg.get("SPLIT_K", 1)))[0]
    mask = 0
    for bits, bit in GSCALE_KINDS.items():
        step = gscale_step_rows(bits, int(cfg["BLOCK_K"]))
        if w.kinds_mask & bit and bits in groups and groups[bits] % step == 0 and k_split % step == 0:
            mask |= bit
    return mask


def _cfg_list(cfg: dict[str, int], w: PackedWeights | None = None) -> list[int]:
    """The op's config list (also the warm-up key): BLOCK_M/N/K, warps, stages, FMA, SPLIT_K, KT, ASM, SWAP,
    GSCALE mask (``gscale_mask(w, cfg)``)."""
    return [int(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")] + [
        int(cfg.get("FMA", 0)), int(cfg.get("SPLIT_K", 1)), int(cfg.get("KT", 0)),
        int(cfg.get("ASM", 0)), int(cfg.get("SWAP", 0)), gscale_mask(w, cfg)]


def grouped_gemm(x: torch.Tensor, w: PackedWeights, cfg: dict[str, int], *, mode: int, route: Route | None = None,
                 a_div: int = 1, topk_weights: torch.Tensor | None = None, zero_init: bool = False) -> torch.Tensor:
    """One launch over all experts of a projection.

    Args:
        x: [R, K] activations (bf16/fp16/fp32); row of pair r is ``x[r // a_div]``.
        w: the projection, [N, K] per expert (``n_up = N/2`` for MODE_GATE_UP).
        cfg: launch config (``_common.configs``); BLOCK_M must equal ``route.block_m``; optional ``"FMA": 1``
            runs the K loop as fp32 broadcast-multiply-add instead of tl.dot (decode: BLOCK_M 1..8 allowed);
            optional ``"SPLIT_K": S`` (power of two <= 16) splits K over S programs per tile (decode: more
            programs in flight) with fp32 partials summed by one more launch; optional ``"KT": 1`` dequantizes
            all code slots of a step into one K-ordered tile and runs one ``tl.dot`` per step (tensor-core path);
            optional ``"ASM": 1`` dequantizes 4-bit, 2-bit and int3 experts with packed-bf16 PTX (GPU, bf16
            activations); optional ``"SWAP": 1`` (tensor-core per-slot loop, not FMA / KT) computes
            ``acc^T += W x^T`` so the dequantized weights are the dot's A operand (sm90, BLOCK_N >= 64 per 4 warps:
            wgmma with A in registers), then transposes once for the epilogue; optional ``"GSCALE": 1`` (with
            SWAP) applies scale/zero of plain int4 experts per group to partial sums, for the kinds whose
            group size is a multiple of the step (``gscale_mask``; the others keep the per-element loop).
        mode: MODE_PLAIN, MODE_GATE_UP (fused SiLU-and-mul) or MODE_DOWN (router weights applied).
        route: tile map (None: dense, one expert, rows 0..R-1).
        topk_weights: [T*K] fp32 router weights (MODE_DOWN).
        zero_init: zero the output first (rows of dropped pairs stay 0).
    Returns:
        [T*K or R, N'] x.dtype, N' = N/2 for MODE_GATE_UP else N.
    """
    if x.dim() != 2 or x.shape[1] != w.k:
        raise ValueError(f"grouped_gemm: x must be [R, {w.k}], got {list(x.shape)}")
    if x.dtype not in _ACT_DTYPES:
        raise ValueError(f"grouped_gemm: x dtype {x.dtype} not in {_ACT_DTYPES}")
    min_m = 1 if cfg.get("FMA") else 16  # FMA configs (no tl.dot) take BLOCK_M 1..8 for few rows per expert
    if (any(cfg[b] < 16 or cfg[b] & (cfg[b] - 1) for b in ("BLOCK_N", "BLOCK_K"))
            or cfg["BLOCK_M"] < min_m or cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1)):
        raise ValueError(f"grouped_gemm: config {cfg} needs powers of two, BLOCK_N, BLOCK_K >= 16 and BLOCK_M >= "
                         f"{min_m}")
    sk = cfg.get("SPLIT_K", 1)
    if sk < 1 or sk > 16 or sk & (sk - 1):
        raise ValueError(f"grouped_gemm: config SPLIT_K {sk} must be a power of two in 1..16")
    if x.stride(1) != 1:
        x = x.contiguous()
    n_out = w.n // 2 if mode == MODE_GATE_UP else w.n
    dense = route is None
    if dense:
        dummy = w.einfo
        sorted_ids = block_expert = num_post = dummy
        num_valid, out_rows = x.shape[0], x.shape[0]
    else:
        if route.block_m != cfg["BLOCK_M"]:
            raise ValueError(f"grouped_gemm: route BLOCK_M {route.block_m} != config BLOCK_M {cfg['BLOCK_M']}")
        sorted_ids, block_expert, num_post = route.sorted_ids, route.block_expert, route.num_post
        num_valid = out_rows = route.num_valid
    if mode == MODE_DOWN:
        if topk_weights is None or topk_weights.numel() != num_valid:
            raise ValueError(f"grouped_gemm: MODE_DOWN needs topk_weights with {num_valid} elements")
        tw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    else:
        tw = w.einfo
    return torch.ops.mxserve.grouped_gemm(x, w.qw, w.pw, w.meta, w.wbf, w.einfo, sorted_ids, block_expert, num_post,
                                          tw, n_out, w.k, w.n, n_out, a_div, num_valid, out_rows, mode, dense,
                                          zero_init, _cfg_list(cfg, w), w.kinds_mask)


@torch.library.custom_op("mxserve::dequant_bf16", mutates_args=())
def dequant_bf16_op(qw: torch.Tensor, pw: torch.Tensor, meta: torch.Tensor, wbf: torch.Tensor, einfo: torch.Tensor,
                    n: int, k: int, kinds: int) -> torch.Tensor:
    """Raw op: every expert's W^T as bf16 ``[E, K, N]`` (K-major, the ``wbf`` layout); use ``dequant_bf16``."""
    if not HAS_TRITON:
        raise RuntimeError("mxserve::dequant_bf16 needs Triton")
    e = einfo.shape[0]
    out = torch.empty((e, k, n), dtype=torch.bfloat16, device=qw.device)
    block_n = 64
    _kernels.dequant_kernel[(e, triton.cdiv(k, 256), triton.cdiv(n, block_n))](
        out, qw, pw, meta, wbf, einfo, n, k, NFIELDS=NFIELDS, KINDS=kinds, BLOCK_N=block_n, num_warps=4)
    return out


@dequant_bf16_op.register_fake
def _(qw, pw, meta, wbf, einfo, n, k, kinds):
    return qw.new_empty((einfo.shape[0], k, n), dtype=torch.bfloat16)


def dequant_bf16(w: PackedWeights) -> PackedWeights:
    """The projection with every expert dequantized to bf16 (prefill path: one bandwidth-bound dequant launch, then
    the bf16 grouped GEMM at tensor-core speed). Experts with no weights stay empty.

    Args:
        w: the projection ([N, K] per expert), any mix of schemes; needs (K*N) % 16 == 0.
    Returns:
        PackedWeights whose experts are all bf16 (``wbf`` = [E, K, N]); holds E*K*N*2 bytes.
    """
    if (w.k * w.n) % OFF_UNIT:
        raise ValueError(f"dequant_bf16: K*N = {w.k * w.n} must be a multiple of {OFF_UNIT}")
    wbf = torch.ops.mxserve.dequant_bf16(w.qw, w.pw, w.meta, w.wbf, w.einfo, w.n, w.k, w.kinds_mask)
    info = w.einfo.clone()
    live = info[:, F_KIND] != KIND_NONE
    info[:, F_KIND] = torch.where(live, KIND_BF16, KIND_NONE)
    info[:, F_BITS] = 16
    info[:, F_WOFF] = torch.arange(info.shape[0], device=info.device) * (w.k * w.n // OFF_UNIT)
    # kinds given: no einfo read back to the host (this runs inside forwards, possibly under CUDA-graph capture)
    return PackedWeights(w.qw, w.pw, w.meta, wbf.reshape(-1), info, w.n, w.k, kinds=1 if w.kinds_mask else 0)
