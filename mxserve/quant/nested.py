"""Nested "matryoshka" weights (D2MoE MWQ): an int2 base plus binary residual planes for 3- and 4-bit prefixes.

Base: asymmetric int2 per group with a *bin-centred* grid (``scale = range/4``, ``zero = min + scale/2``), so the
four base levels sit at the centres of four equal bins; plane ``p`` (p = 3, 4) stores ``sign(residual)`` and one
per-group scale ``mean|residual|`` (the least-squares optimum for fixed signs, optionally weighted by diag H).
With the ideal scales ``scale/4, scale/8`` the 4-bit prefix is the uniform 16-level grid on bin centres, i.e. as
fine as int4 RTN; each prefix dequantizes on its own (``base + sum_{q<=p} s_q sign_q``).

Storage: base tensors ``qweight/scales/zeros`` and planes ``plane{p}_weight`` (1 bit/weight, packed like 1-bit
codes) + ``plane{p}_scales``; the checkpoint writer puts each plane in its own shard so a runtime can load the
base first and planes on demand.
"""
from __future__ import annotations

import torch

from mxserve_kernels.formats import NESTED_BASE_BITS, NESTED_MAX_BITS, WeightScheme
from mxserve_kernels.quant.reference import pack_codes, scale_torch_dtype
from mxserve.quant.primitives import _grouped, expand


def nested_params(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin-centred int2 base (scales, zeros) [..., N, K/G], rounded to the storage dtype (as float32)."""
    sd = scale_torch_dtype(scheme)
    wg = _grouped(w.float(), scheme.group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / (1 << NESTED_BASE_BITS)).to(sd).float()
    z = (lo + s / 2).to(sd).float()
    return s, z


def _plane_scale(resid: torch.Tensor, g: int, sd: torch.dtype, col_weight: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean |resid| per group: [..., N, K] -> [..., N, K/G] (storage-rounded, float32)."""
    a = _grouped(resid.abs(), g)
    if col_weight is None:
        return a.mean(-1).to(sd).float()
    cw = _grouped(col_weight.float().unsqueeze(-2), g)
    return ((a * cw).sum(-1) / cw.sum(-1).clamp_min(1e-30)).to(sd).float()


def nested_quantize_values(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                           planes: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Greedy prefix-consistent rounding of ``w`` (same shape as s, z, planes[i]: per element).

    Returns:
        (base codes uint8, [sign bits uint8 per plane], dequantized value at the full prefix).
    """
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round((w - z) / safe), 0, (1 << NESTED_BASE_BITS) - 1)
    val = q * s + z
    signs = []
    for ps in planes:
        bit = (w >= val).to(torch.uint8)
        val = val + (bit.float() * 2 - 1) * ps
        signs.append(bit)
    return q.to(torch.uint8), signs, val


def quantize_nested(w: torch.Tensor, scheme: WeightScheme, col_weight: torch.Tensor | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """MWQ-quantize one [N, K] weight (all planes up to 4 bits, whatever prefix ``scheme.bits`` says).

    Args:
        w: [N, K] float weight.
        scheme: a nested scheme (its group size and scale dtype are used).
        col_weight: [K] optional input-column importance (diag of the Hessian) for the plane scales.
    Returns:
        (checkpoint tensors {qweight, scales, zeros, plane3_weight, plane3_scales, plane4_weight, plane4_scales},
         {prefix bits: dequantized float32 [N, K]} for prefixes 2, 3, 4).
    """
    if not scheme.nested:
        raise ValueError(f"quantize_nested: scheme {scheme.name} is not nested")
    n, k = w.shape
    scheme.check_shape(n, k, "quantize_nested")
    g, sd = scheme.group_size, scale_torch_dtype(scheme)
    wf = w.float()
    s, z = nested_params(wf, scheme)
    se, ze = expand(s, g), expand(z, g)
    base_q, _, val = nested_quantize_values(wf, se, ze, [])
    deq = {NESTED_BASE_BITS: val.clone()}
    out = {"qweight": pack_codes(base_q, NESTED_BASE_BITS).cpu(), "scales": s.to(sd).cpu(), "zeros": z.to(sd).cpu()}
    for p in range(NESTED_BASE_BITS + 1, NESTED_MAX_BITS + 1):
        resid = wf - val
        ps = _plane_scale(resid, g, sd, col_weight)
        bit = (resid >= 0).to(torch.uint8)
        val = val + (bit.float() * 2 - 1) * expand(ps, g)
        out[f"plane{p}_weight"] = pack_codes(bit, 1).cpu()
        out[f"plane{p}_scales"] = ps.to(sd).cpu()
        deq[p] = val.clone()
    return out, deq
