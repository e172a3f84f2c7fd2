"""Dense dequant GEMM for attention / dense projections: W2/3/4/8 group-wise (or bf16) x activations.

Reuses the grouped-GEMM kernel with one expert and an identity tile map (``DENSE``), so the linear path and the MoE
path share one runtime layout and one dequant code path.
"""
from __future__ import annotations

import torch

from mxserve_kernels._common import configs
from mxserve_kernels._common.layout import OFF_UNIT, PackedWeights, pack_projection
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe.grouped_gemm import MODE_PLAIN, dequant_bf16, grouped_gemm, triton_usable
from mxserve_kernels.quant import reference


# M >= this (16-bit activations): dequantize the weight to bf16 once, then the bf16 GEMM (H200 2048x2048: in-loop
# int4 dequant 119 us at M=64 and 234 us at M=1024 vs 35-37 us for bf16 weights; the dequant itself is ~5 us)
LINEAR_DEQUANT_ROWS = 64


class LinearWeights(PackedWeights):
    """One [N, K] linear weight in the runtime layout (a ``PackedWeights`` with one expert)."""


def prepare_linear(scheme: WeightScheme, tensors: dict[str, torch.Tensor], *, k: int, device=None) -> LinearWeights:
    """The one conversion canonical -> runtime layout for a dense linear.

    Args:
        scheme: the weight's scheme. tensors: canonical tensors (``formats.tensor_names``); N is read from them.
        k: in_features K. device: target device (default: the tensors').
    Returns:
        LinearWeights.
    """
    first = tensors["weight"] if scheme.bits == 16 else tensors.get("qweight")
    if first is None:
        raise ValueError(f"prepare_linear: missing tensor 'qweight' for scheme {scheme.name}")
    pw = pack_projection([(scheme, tensors)], n=int(first.shape[0]), k=k, device=device, where="linear")
    return LinearWeights(**pw.tensors(), n=pw.n, k=pw.k)


def linear_config(lw: PackedWeights, m: int) -> dict[str, int]:
    """Tuned config for M rows (file key E=1,N,K), else the documented default."""
    tuned = configs.lookup({"E": 1, "N": lw.n, "K": lw.k}, m)
    return tuned["w"] if tuned is not None else configs.default_config(m)


def dequant_linear(x: torch.Tensor, lw: PackedWeights, bias: torch.Tensor | None = None,
                   config: dict[str, int] | None = None) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias, fused dequant, fp32 accumulation.

    Args:
        x: [..., K] bf16/fp16/fp32. lw: LinearWeights. bias: optional [N]. config: launch config override.
    Returns:
        [..., N] x.dtype. CPU without TRITON_INTERPRET=1: ``reference.dequant_linear``.
    """
    if x.shape[-1] != lw.k:
        raise ValueError(f"dequant_linear: x last dim {x.shape[-1]} != in_features K={lw.k}")
    if not triton_usable(x):
        return reference.dequant_linear(x, lw, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, lw.k)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, lw.n)
    w = lw
    if (x2.shape[0] >= LINEAR_DEQUANT_ROWS and x2.dtype != torch.float32 and lw.kinds_mask & ~1
            and (lw.k * lw.n) % OFF_UNIT == 0):
        w = dequant_bf16(lw)
    y = grouped_gemm(x2, w, config or linear_config(lw, x2.shape[0]), mode=MODE_PLAIN)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*lead, lw.n)
