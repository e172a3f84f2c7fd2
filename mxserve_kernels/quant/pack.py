"""Triton launchers for the canonical bit stream (``formats.py``): ``pack_codes``, ``unpack_codes``, ``dequantize``.

Same signatures and bit-exact results as ``quant.reference`` (the oracle). Each launcher checks its inputs
(ValueError naming the tensor), allocates the output and launches one kernel from ``pack_kernels.py``. Tensors on
CPU without ``TRITON_INTERPRET=1`` (or without Triton) go to the reference.
"""
from __future__ import annotations

import os

import torch

from mxserve_kernels.formats import NESTED_BASE_BITS, WeightScheme
from mxserve_kernels.quant import reference as _ref

try:
    import triton

    from mxserve_kernels.quant import pack_kernels as _k
    HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton is a hard dependency on GPU hosts
    HAS_TRITON = False

TILE = 4096  # elements (codes or bytes) per program: BLOCK_N rows x BLOCK columns


def _grid(n: int, cols: int) -> tuple[tuple[int, int], dict]:
    """Grid and tile constexprs for an [n, cols] output: BLOCK = pow2 >= cols (<= 1024), BLOCK_N fills TILE."""
    block = min(1024, triton.next_power_of_2(cols))
    block_n = min(triton.next_power_of_2(n), TILE // block)
    return (triton.cdiv(n, block_n), triton.cdiv(cols, block)), {"BLOCK_N": block_n, "BLOCK": block}


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _check_2d(t, name: str, fn: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{fn}: {name} must be a 2-D tensor, got "
                         f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dim into a little-endian bit stream.

    Args:
        codes: [N, K] integer tensor with ``0 <= codes < 2**bits``; K*bits must be a multiple of 8.
        bits: 1..8.
    Returns:
        [N, K*bits/8] uint8, on ``codes``' device.
    """
    _check_2d(codes, "codes", "pack_codes")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"pack_codes: bits must be in 1..8, got {bits}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"pack_codes: codes must be an integer tensor, got {codes.dtype}")
    if not _use_triton(codes):
        return _ref.pack_codes(codes, bits)
    n, k = codes.shape
    if (k * bits) % 8:
        raise ValueError(f"pack_codes: K={k} * bits={bits} is not a whole number of bytes")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"pack_codes: codes out of range for {bits} bits")
    nbytes = k * bits // 8
    out = torch.empty((n, nbytes), dtype=torch.uint8, device=codes.device)
    if out.numel() == 0:
        return out
    c = codes.contiguous()
    grid, tile = _grid(n, nbytes)
    _k.pack_kernel[grid](c, out, n, k, nbytes, c.stride(0), out.stride(0), BITS=int(bits), **tile)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_codes``.

    Args:
        packed: [N, K*bits/8] uint8. bits: 1..8. k: K, codes per row.
    Returns:
        [N, K] uint8 codes.
    """
    _check_2d(packed, "packed", "unpack_codes")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"unpack_codes: bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.shape[1] * 8 != k * bits:
        raise ValueError(f"unpack_codes: expected uint8 [N, {k * bits // 8}], got {packed.dtype} {list(packed.shape)}")
    if not _use_triton(packed):
        return _ref.unpack_codes(packed, bits, k)
    n = packed.shape[0]
    out = torch.empty((n, k), dtype=torch.uint8, device=packed.device)
    if out.numel() == 0:
        return out
    p = packed.contiguous()
    grid, tile = _grid(n, k)
    _k.unpack_kernel[grid](p, out, n, k, p.stride(0), out.stride(0), BITS=int(bits), **tile)
    return out


def _get(tensors: dict, name: str, shape: tuple[int, int], dtype: torch.dtype | None, device) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ValueError(f"dequantize: tensors[{name!r}] is missing")
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"dequantize: tensors[{name!r}] must be a tensor, got {type(t).__name__}")  # noqa: TRY004
    bad_dtype = t.dtype != dtype if dtype is not None else not t.dtype.is_floating_point
    if tuple(t.shape) != shape or bad_dtype:
        raise ValueError(f"dequantize: tensors[{name!r}] must be {dtype or 'float'} {list(shape)}, "
                         f"got {t.dtype} {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"dequantize: tensors[{name!r}] is on {t.device}, expected {device} (as 'qweight')")
    return t.contiguous()


def dequantize(scheme: WeightScheme, tensors: dict[str, torch.Tensor], k: int,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize one [N, K] weight from its canonical tensors (names from ``formats.tensor_names``).

    Args:
        scheme: the weight's scheme; nested schemes dequantize the prefix ``scheme.bits`` (2, 3 or 4 bits).
        tensors: ``qweight`` uint8 [N, K*B/8], ``scales`` (+ ``zeros``) [N, K/G], nested ``plane{p}_weight`` uint8
            [N, K/8] and ``plane{p}_scales`` [N, K/G] for p = 3..bits; ``weight`` [N, K] for bf16.
        k: K, in_features. out_dtype: float32, bfloat16 or float16.
    Returns:
        [N, K] ``out_dtype``: ``reference.dequantize`` bit for bit (fp32 math, one rounding to out_dtype).
    """
    if scheme.bits == 16:
        if "weight" not in tensors:
            raise ValueError("dequantize: tensors['weight'] is missing")
        return tensors["weight"].to(out_dtype)
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dequantize: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    qw = tensors.get("qweight")
    if not isinstance(qw, torch.Tensor) or qw.dim() != 2:
        raise ValueError("dequantize: tensors['qweight'] must be a 2-D uint8 tensor")
    n = qw.shape[0]
    scheme.check_shape(n, k, where="dequantize")
    g = scheme.group_size
    base_bits = NESTED_BASE_BITS if scheme.nested else scheme.bits
    qw = _get(tensors, "qweight", (n, k * base_bits // 8), torch.uint8, qw.device)
    sc = _get(tensors, "scales", (n, k // g), None, qw.device)
    zr = sc if scheme.symmetric else _get(tensors, "zeros", (n, k // g), None, qw.device)
    nplanes = scheme.bits - NESTED_BASE_BITS if scheme.nested else 0
    pw = [_get(tensors, f"plane{p}_weight", (n, k // 8), torch.uint8, qw.device)
          for p in range(NESTED_BASE_BITS + 1, NESTED_BASE_BITS + 1 + nplanes)]
    ps = [_get(tensors, f"plane{p}_scales", (n, k // g), None, qw.device)
          for p in range(NESTED_BASE_BITS + 1, NESTED_BASE_BITS + 1 + nplanes)]
    if not _use_triton(qw):
        return _ref.dequantize(scheme, tensors, k, out_dtype)
    pw, ps = pw + [qw] * (2 - nplanes), ps + [sc] * (2 - nplanes)  # unused slots: any valid pointer
    out = torch.empty((n, k), dtype=out_dtype, device=qw.device)
    if out.numel() == 0:
        return out
    bf16 = out_dtype == torch.bfloat16
    grid, tile = _grid(n, k)
    _k.dequant_kernel[grid](
        out.view(torch.int16) if bf16 else out, qw, sc, zr, pw[0], ps[0], pw[1], ps[1], n, k,
        out.stride(0), qw.stride(0), sc.stride(0), pw[0].stride(0) if nplanes else 0, BITS=base_bits, G=g, SYMMETRIC=scheme.symmetric, NPLANES=nplanes,
        ROUND_BF16=bf16, **tile)
    return out
