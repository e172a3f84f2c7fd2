"""Round-to-nearest canonical tensors for contract tests (the quantizer package is developed in parallel)."""
from __future__ import annotations

import torch

from mxserve_kernels.formats import NESTED_BASE_BITS, NESTED_MAX_BITS, WeightScheme, tensor_names
from mxserve_kernels.quant.reference import pack_codes, scale_torch_dtype


def _asym(w: torch.Tensor, bits: int, g: int, sd: torch.dtype):
    n, k = w.shape
    wg = w.reshape(n, k // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8).to(sd)
    zero = lo.to(sd)
    q = torch.round((wg - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, (1 << bits) - 1)
    deq = q * scale.float()[..., None] + zero.float()[..., None]
    return q.reshape(n, k).to(torch.uint8), scale, zero, deq.reshape(n, k)


def quantize_rtn(w: torch.Tensor, scheme: WeightScheme) -> dict[str, torch.Tensor]:
    """Canonical tensors (``formats.tensor_names(scheme)``) of float weight ``w`` [N, K] under ``scheme``."""
    if scheme.bits == 16:
        return {"weight": w.to(torch.bfloat16)}
    w = w.float()
    n, k = w.shape
    g, sd = scheme.group_size, scale_torch_dtype(scheme)
    if scheme.nested:
        q, s, z, deq = _asym(w, NESTED_BASE_BITS, g, sd)
        out = {"qweight": pack_codes(q, NESTED_BASE_BITS), "scales": s, "zeros": z}
        r = w - deq
        for p in range(NESTED_BASE_BITS + 1, NESTED_MAX_BITS + 1):
            sign = (r >= 0).to(torch.uint8)
            ps = r.abs().reshape(n, k // g, g).mean(-1).to(sd)
            out[f"plane{p}_weight"] = pack_codes(sign, 1)
            out[f"plane{p}_scales"] = ps
            r = r - (sign.float() * 2 - 1) * ps.float().repeat_interleave(g, 1)
    elif scheme.symmetric:
        half = 1 << (scheme.bits - 1)
        scale = (w.reshape(n, k // g, g).abs().amax(-1) / (half - 1)).clamp_min(1e-8).to(sd)
        q = torch.round(w / scale.float().repeat_interleave(g, 1)).clamp(-(half - 1), half - 1) + half
        out = {"qweight": pack_codes(q.to(torch.uint8), scheme.bits), "scales": scale}
    else:
        q, s, z, _ = _asym(w, scheme.bits, g, sd)
        out = {"qweight": pack_codes(q, scheme.bits), "scales": s, "zeros": z}
    assert set(out) == set(tensor_names(scheme))
    return out
