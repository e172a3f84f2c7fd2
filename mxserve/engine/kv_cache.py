"""Per-sequence KV cache of the embedded engine, with a pluggable storage quantizer.

``KVCache`` stores K/V of every layer as ``[L, kv_heads, D]`` in a storage dtype (bf16 by default, fp32 for exact
comparisons) with amortised doubling growth. ``QuantizedKVCache`` stores them through a ``KVQuantizer`` (any object
with ``quantize``/``dequantize``/``nbytes``/``bits_per_element``/``name``) and dequantizes on read, so attention
sees exactly what a quantized-KV kernel would. ``make_cache_factory(spec)`` picks the class from a string.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Protocol

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class KVQuantizer(Protocol):
    """Storage quantizer of K or V rows. x: [t, kv_heads, D] -> opaque state, and back."""

    name: str
    bits_per_element: float

    def quantize(self, x: torch.Tensor) -> Any: ...

    def dequantize(self, state: Any, dtype: torch.dtype) -> torch.Tensor: ...

    def nbytes(self, state: Any) -> int: ...


class KVCache:
    """Plain KV cache of one sequence.

    Args:
        layers: decoder layer count.
        kv_heads: KV heads per layer.
        head_dim: D.
        compute_dtype: dtype handed back to attention.
        store_dtype: storage dtype (bf16 default).
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, compute_dtype: torch.dtype,
                 store_dtype: torch.dtype = torch.bfloat16):
        self.compute_dtype, self.store_dtype = compute_dtype, store_dtype
        self._k = [torch.empty(0, kv_heads, head_dim, dtype=store_dtype) for _ in range(layers)]
        self._v = [torch.empty(0, kv_heads, head_dim, dtype=store_dtype) for _ in range(layers)]
        self._len = [0] * layers

    @property
    def precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.store_dtype]

    @property
    def bits_per_element(self) -> float:
        return float(torch.finfo(self.store_dtype).bits)

    def __len__(self) -> int:
        return self._len[0] if self._len else 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new rows (k, v: [t, kv_heads, D]) and return all rows ``[L, kv_heads, D]`` in compute dtype."""
        n, t = self._len[layer], k.shape[0]
        if n + t > self._k[layer].shape[0]:
            cap = max(16, 2 * (n + t))
            for buf in (self._k, self._v):
                new = torch.empty(cap, *buf[layer].shape[1:], dtype=self.store_dtype)
                new[:n] = buf[layer][:n]
                buf[layer] = new
        self._k[layer][n:n + t] = k.to(self.store_dtype)
        self._v[layer][n:n + t] = v.to(self.store_dtype)
        self._len[layer] = n + t
        return (self._k[layer][:n + t].to(self.compute_dtype), self._v[layer][:n + t].to(self.compute_dtype))

    def nbytes(self) -> int:
        """Bytes of stored K/V rows (live rows, not spare capacity)."""
        if not self._k:
            return 0
        kvh, d = self._k[0].shape[1:]
        return 2 * kvh * d * self._k[0].element_size() * sum(self._len)


class QuantizedKVCache(KVCache):
    """KV cache whose rows are stored through ``quantizer`` (chunks as appended) and dequantized on read."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, compute_dtype: torch.dtype,
                 quantizer: KVQuantizer):
        super().__init__(layers, kv_heads, head_dim, compute_dtype)
        self.quantizer = quantizer
        self._qk: list[list[Any]] = [[] for _ in range(layers)]
        self._qv: list[list[Any]] = [[] for _ in range(layers)]

    @property
    def precision(self) -> str:
        return self.quantizer.name

    @property
    def bits_per_element(self) -> float:
        return float(self.quantizer.bits_per_element)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._qk[layer].append(self.quantizer.quantize(k))
        self._qv[layer].append(self.quantizer.quantize(v))
        self._len[layer] += k.shape[0]
        deq = self.quantizer.dequantize
        return (torch.cat([deq(s, self.compute_dtype) for s in self._qk[layer]]),
                torch.cat([deq(s, self.compute_dtype) for s in self._qv[layer]]))

    def nbytes(self) -> int:
        return sum(self.quantizer.nbytes(s) for chunks in (self._qk, self._qv) for c in chunks for s in c)


class MinMaxKVQuantizer:
    """Per-token, per-head asymmetric min-max integer quantizer (engine-local fallback when no KV reference
    quantizer is available). Codes stay unpacked uint8 in memory; ``nbytes`` reports the packed size.

    Args:
        bits: 2, 4 or 8.
    """

    def __init__(self, bits: int):
        if bits not in (2, 4, 8):
            raise ValueError(f"kv cache bits must be 2, 4 or 8, got {bits}")
        self.bits = bits
        self.name = f"int{bits}"
        self._d = None

    @property
    def bits_per_element(self) -> float:
        # scale + zero in fp16 per (token, head) row of D elements
        return self.bits + (32.0 / self._d if self._d else 0.0)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [t, kvh, D] -> (codes uint8 [t, kvh, D], scale fp16 [t, kvh, 1], zero fp16 [t, kvh, 1])."""
        self._d = x.shape[-1]
        xf = x.float()
        lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
        scale = ((hi - lo) / (2 ** self.bits - 1)).clamp_min(1e-8).half()
        zero = lo.half()
        q = ((xf - zero.float()) / scale.float()).round().clamp(0, 2 ** self.bits - 1).to(torch.uint8)
        return q, scale, zero

    def dequantize(self, state, dtype: torch.dtype) -> torch.Tensor:
        q, scale, zero = state
        return (q.float() * scale.float() + zero.float()).to(dtype)

    def nbytes(self, state) -> int:
        q, scale, zero = state
        return q.numel() * self.bits // 8 + 2 * scale.numel() + 2 * zero.numel()


def make_cache(layers: int, kv_heads: int, head_dim: int, compute_dtype: torch.dtype) -> KVCache:
    """Default cache: bf16 storage."""
    return KVCache(layers, kv_heads, head_dim, compute_dtype)


def make_cache_factory(kind: str) -> Callable[..., KVCache]:
    """Cache factory for ``--kv-cache-dtype``: ``bf16`` | ``fp16`` | ``fp32`` | ``int8`` | ``int4`` | ``int2``.

    Returns:
        ``factory(layers, kv_heads, head_dim, compute_dtype) -> KVCache``.
    """
    if kind in _DTYPES:
        return partial(_plain, store_dtype=_DTYPES[kind])
    if kind in ("int8", "int4", "int2"):
        bits = int(kind[3:])
        return lambda layers, kvh, d, dt: QuantizedKVCache(layers, kvh, d, dt, MinMaxKVQuantizer(bits))
    raise ValueError(f"--kv-cache-dtype {kind!r}: expected one of bf16, fp16, fp32, int8, int4, int2")


def _plain(layers: int, kv_heads: int, head_dim: int, compute_dtype: torch.dtype, *, store_dtype) -> KVCache:
    return KVCache(layers, kv_heads, head_dim, compute_dtype, store_dtype)
