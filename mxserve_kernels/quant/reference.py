"""Pure-PyTorch reference for the canonical formats in ``mxserve_kernels.formats`` (the bit-exact oracle).

Same signatures as the Triton launchers in ``pack.py``; also the CPU runtime path.
"""
from __future__ import annotations

import torch

from mxserve_kernels.formats import NESTED_BASE_BITS, WeightScheme

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def scale_torch_dtype(scheme: WeightScheme) -> torch.dtype:
    return _DTYPES[scheme.scale_dtype]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dim into a little-endian bit stream.

    Args:
        codes: [N, K] integer tensor with ``0 <= codes < 2**bits``; K*bits must be a multiple of 8.
        bits: 1..8.
    Returns:
        [N, K*bits/8] uint8.
    """
    n, k = codes.shape
    if (k * bits) % 8:
        raise ValueError(f"pack_codes: K={k} * bits={bits} is not a whole number of bytes")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"pack_codes: codes out of range for {bits} bits")
    shifts = torch.arange(bits, device=c.device)
    stream = ((c.unsqueeze(-1) >> shifts) & 1).reshape(n, k * bits)  # bit i of the row stream
    weights = (1 << torch.arange(8, device=c.device))
    return (stream.reshape(n, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: [N, K*bits/8] uint8 -> [N, K] uint8 codes."""
    n = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape[1] * 8 != k * bits:
        raise ValueError(f"unpack_codes: expected uint8 [N, {k * bits // 8}], got {packed.dtype} {list(packed.shape)}")
    p = packed.to(torch.int64)
    stream = ((p.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1).reshape(n, k, bits)
    return (stream * (1 << torch.arange(bits, device=p.device))).sum(-1).to(torch.uint8)


def dequantize(scheme: WeightScheme, tensors: dict[str, torch.Tensor], k: int,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize one [N, K] weight from its canonical tensors (names from ``formats.tensor_names``).

    Nested schemes dequantize the prefix ``scheme.bits`` (2, 3 or 4 bits).
    """
    if scheme.bits == 16:
        return tensors["weight"].to(out_dtype)
    g = scheme.group_size
    base_bits = NESTED_BASE_BITS if scheme.nested else scheme.bits
    q = unpack_codes(tensors["qweight"], base_bits, k).to(torch.float32)
    n = q.shape[0]
    scales = tensors["scales"].to(torch.float32).repeat_interleave(g, dim=1)
    if scheme.symmetric:
        w = (q - float(1 << (base_bits - 1))) * scales
    else:
        w = q * scales + tensors["zeros"].to(torch.float32).repeat_interleave(g, dim=1)
    if scheme.nested:
        for p in range(NESTED_BASE_BITS + 1, scheme.bits + 1):
            sign = unpack_codes(tensors[f"plane{p}_weight"], 1, k).to(torch.float32) * 2.0 - 1.0
            w = w + sign * tensors[f"plane{p}_scales"].to(torch.float32).repeat_interleave(g, dim=1)
    assert w.shape == (n, k)
    return w.to(out_dtype)


def dequant_linear(x: torch.Tensor, lw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of ``quant.dequant_linear``: ``x @ dequant(W)^T + bias`` in fp32 from the runtime layout.

    Args:
        x: [..., K]. lw: LinearWeights ([N, K]). bias: optional [N].
    Returns:
        [..., N] x.dtype.
    """
    from mxserve_kernels._common.layout import dequant_expert
    if x.shape[-1] != lw.k:
        raise ValueError(f"dequant_linear: x last dim {x.shape[-1]} != in_features K={lw.k}")
    y = x.to(torch.float32) @ dequant_expert(lw, 0).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
