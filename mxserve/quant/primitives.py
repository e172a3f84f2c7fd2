"""Group-wise integer quantization primitives (RTN) in the canonical format of ``mxserve_kernels.formats``.

All functions accept weights ``w`` of shape ``[..., N, K]`` (any leading batch dims, e.g. ``[E, N, K]`` for all
experts of a layer) and work on ``float32`` copies. Scales and zeros are rounded to their storage dtype (bf16/fp16)
*before* codes are chosen, so ``dequantize(pack(...))`` reproduces exactly the values the quantizer assumed.
Packing and dequantization are delegated to the bit-exact oracle ``mxserve_kernels.quant.reference``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant.reference import pack_codes, scale_torch_dtype

# Clip-search grid (fraction of the group range kept), Marlin-GPTQ style: 1.0 down to MAX_SHRINK.
CLIP_GRID = 20
MAX_SHRINK = 0.75
# 1-bit: clip-search grid of level spreads around the 2-means solution (fraction of its spread), and Lloyd steps.
ONE_BIT_CLIP = (0.8, 0.9, 1.0, 1.1, 1.25)
LLOYD_ITERS = 8
# Device bytes of pack_codes temporaries per call (codes are packed in row blocks under this).
PACK_TEMP_BYTES = 32 << 20


@dataclass
class GroupParams:
    """Per-group quantization parameters, already rounded to the storage dtype (held as float32).

    Attributes:
        scales: [..., N, K/G] float32.
        zeros: [..., N, K/G] float32 (asymmetric) or None (symmetric).
    """

    scales: torch.Tensor
    zeros: torch.Tensor | None


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """[..., N, K] -> [..., N, K/G, G]."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: WeightScheme) -> GroupParams:
    sd = scale_torch_dtype(scheme)
    if scheme.symmetric:
        qmax = (1 << (scheme.bits - 1)) - 1
        s = torch.maximum(lo.abs(), hi.abs()) / qmax
        return GroupParams(scales=s.to(sd).float(), zeros=None)
    s = (hi - lo) / ((1 << scheme.bits) - 1)
    return GroupParams(scales=s.to(sd).float(), zeros=lo.to(sd).float())


def two_level_params(w: torch.Tensor, scheme: WeightScheme, col_weight: torch.Tensor | None = None,
                     iters: int = LLOYD_ITERS) -> GroupParams:
    """1-bit (``q*scale + zero``, q in {0, 1}) group parameters by weighted 2-means (Lloyd) per group.

    Min-max is useless at one bit (its two levels sit at the group extremes); the MSE-optimal pair of levels is
    the pair of conditional means either side of their midpoint, found by a few Lloyd iterations started at the
    group mean. ``zero`` = low level, ``scale`` = high - low, both rounded to the storage dtype.

    Args:
        w: [..., N, K] weight. col_weight: [..., K] non-negative importance per input column (diag H) or None.
    Returns:
        GroupParams with [..., N, K/G] scales and zeros.
    """
    g = scheme.group_size
    wg = _grouped(w.float(), g)                                          # [..., N, K/G, G]
    if col_weight is None:
        cw = torch.ones_like(wg)
    else:
        cw = _grouped(col_weight.float().clamp_min(0).unsqueeze(-2), g).expand_as(wg) + 1e-12
    lo_v, hi_v = wg.amin(-1), wg.amax(-1)
    t = (wg * cw).sum(-1) / cw.sum(-1)
    for _ in range(iters):   # weights split by side (where/subtract: same values as cw * mask, fewer temporaries)
        above = wg > t.unsqueeze(-1)
        wa = torch.where(above, cw, 0.0)
        del above
        wb = cw - wa
        c_hi = torch.where(wa.sum(-1) > 0, (wg * wa).sum(-1) / wa.sum(-1).clamp_min(1e-30), hi_v)
        c_lo = torch.where(wb.sum(-1) > 0, (wg * wb).sum(-1) / wb.sum(-1).clamp_min(1e-30), lo_v)
        del wa, wb
        t = 0.5 * (c_lo + c_hi)
    sd = scale_torch_dtype(scheme)
    return GroupParams(scales=(c_hi - c_lo).to(sd).float(), zeros=c_lo.to(sd).float())


def group_params(w: torch.Tensor, scheme: WeightScheme, clip: torch.Tensor | float = 1.0,
                 col_weight: torch.Tensor | None = None) -> GroupParams:
    """Group parameters of ``w`` [..., N, K]: min-max, ``clip`` ([..., N, K/G] or scalar) shrinks the range.

    1-bit schemes use ``two_level_params`` (weighted by ``col_weight`` [..., K] when given); ``clip`` then
    scales the distance of both levels from their midpoint.
    """
    if scheme.bits == 1:
        p = two_level_params(w, scheme, col_weight)
        if isinstance(clip, float) and clip == 1.0:
            return p
        mid = p.zeros + 0.5 * p.scales
        sd = scale_torch_dtype(scheme)
        return GroupParams(scales=(p.scales * clip).to(sd).float(), zeros=(mid - 0.5 * p.scales * clip).to(sd).float())
    wg = _grouped(w.float(), scheme.group_size)
    lo = wg.amin(-1).clamp(max=0.0) if scheme.symmetric else wg.amin(-1)
    hi = wg.amax(-1).clamp(min=0.0) if scheme.symmetric else wg.amax(-1)
    return _params_from_range(lo * clip, hi * clip, scheme)


def quantize_codes(w: torch.Tensor, p_scales: torch.Tensor, p_zeros: torch.Tensor | None,
                   scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``w`` to the grid of per-element ``scales``/``zeros`` (same shape as ``w``, e.g. one column [..., N]).

    Returns:
        (codes uint8 same shape, dequantized float32 same shape).
    """
    w = w.float()
    safe = torch.where(p_scales == 0, torch.ones_like(p_scales), p_scales)
    if scheme.symmetric:
        mid = 1 << (scheme.bits - 1)
        q = torch.clamp(torch.round(w / safe), -(mid - 1), mid - 1)
        return (q + mid).to(torch.uint8), q * p_scales
    q = torch.clamp(torch.round((w - p_zeros) / safe), 0, (1 << scheme.bits) - 1)
    return q.to(torch.uint8), q * p_scales + p_zeros


def expand(p: torch.Tensor, g: int) -> torch.Tensor:
    """[..., N, K/G] -> [..., N, K] (each group value repeated G times)."""
    return p.repeat_interleave(g, dim=-1)


def fake_quantize(w: torch.Tensor, params: GroupParams, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of a whole [..., N, K] weight under fixed group ``params``."""
    g = scheme.group_size
    return quantize_codes(w, expand(params.scales, g), None if params.zeros is None else expand(params.zeros, g),
                          scheme)


def search_clip(w: torch.Tensor, scheme: WeightScheme, col_weight: torch.Tensor | None = None,
                grid: int = CLIP_GRID, max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """Per-group clip ratio in [max_shrink, 1] minimising the (column-weighted) squared rounding error.

    1-bit: the ratio scales the spread of the two (2-means) levels, searched over ``ONE_BIT_CLIP``.

    Args:
        w: [..., N, K] weight.
        col_weight: [..., K] non-negative importance per input column (e.g. diag of the Hessian) or None.
    Returns:
        [..., N, K/G] float32 clip ratios.
    """
    g = scheme.group_size
    wf = w.float()
    cw = torch.ones(wf.shape[-1], device=w.device) if col_weight is None else col_weight.float()
    cw = _grouped(cw.unsqueeze(-2), g)                      # [..., 1, K/G, G]
    best_err = torch.full(wf.shape[:-1] + (wf.shape[-1] // g,), float("inf"), device=w.device)
    best = torch.ones_like(best_err)
    grid_vals = ONE_BIT_CLIP if scheme.bits == 1 else [1.0 - (1.0 - max_shrink) * i / max(grid - 1, 1)
                                                        for i in range(grid)]
    cw1 = None if col_weight is None else col_weight.float()
    for c in grid_vals:
        _, dq = fake_quantize(wf, group_params(wf, scheme, float(c), cw1), scheme)
        err = (_grouped(dq - wf, g).pow(2) * cw).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, c), best)
    return best


def pack_temp_bytes(rows: int, k: int, bits: int) -> int:
    """Device bytes of ``pack_codes``'s int64 temporaries for [rows, K] codes (code, bit planes, weighted bits)."""
    return rows * k * (8 + 16 * bits)


def pack(scheme: WeightScheme, codes: torch.Tensor, params: GroupParams) -> dict[str, torch.Tensor]:
    """Canonical checkpoint tensors of one [N, K] weight (names from ``formats.tensor_names``), on CPU.

    Packing runs on the codes' device (fast on GPU) in row blocks whose int64 temporaries stay under
    ``PACK_TEMP_BYTES`` (rows pack independently: same bytes as one call), results are moved to CPU."""
    if codes.dim() != 2:
        raise ValueError(f"pack: expected [N, K] codes, got {list(codes.shape)}")
    sd = scale_torch_dtype(scheme)
    n, k = codes.shape
    rows = max(1, PACK_TEMP_BYTES // max(pack_temp_bytes(1, k, scheme.bits), 1))
    parts = [pack_codes(codes[r:r + rows], scheme.bits).cpu() for r in range(0, max(n, 1), rows)]
    qweight = parts[0] if len(parts) == 1 else torch.cat(parts)
    out = {"qweight": qweight, "scales": params.scales.to(sd).cpu().contiguous()}
    if not scheme.symmetric:
        out["zeros"] = params.zeros.to(sd).cpu().contiguous()
    return out


def quantize_rtn(w: torch.Tensor, scheme: WeightScheme, clip_search: bool = False,
                 col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, GroupParams, torch.Tensor]:
    """Round-to-nearest group quantization of ``w`` [..., N, K].

    Returns:
        (codes uint8 [..., N, K], GroupParams, dequantized float32 [..., N, K]).
    """
    scheme.check_shape(w.shape[-2], w.shape[-1], "quantize_rtn")
    clip = search_clip(w, scheme, col_weight) if clip_search else 1.0
    params = group_params(w, scheme, clip, col_weight)
    codes, dq = fake_quantize(w, params, scheme)
    return codes, params, dq


def rtn_tensors(w: torch.Tensor, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of one [N, K] weight quantized with RTN (bf16 passthrough for 16 bits)."""
    if scheme.bits == 16:
        return {"weight": w.to(torch.bfloat16).cpu().contiguous()}
    if scheme.nested:
        from mxserve.quant.nested import quantize_nested
        return quantize_nested(w, scheme)[0]
    codes, params, _ = quantize_rtn(w, scheme)
    return pack(scheme, codes, params)
