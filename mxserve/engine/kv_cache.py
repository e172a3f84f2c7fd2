"""Per-sequence KV caches of the embedded engine. A cache owns attention over what it stores, so a quantized cache
can read each key from whichever copy its format says (packed slots, full-precision sinks, recent window).

* ``KVCache``: plain storage (bf16 default, fp16, fp32) with amortised doubling growth; exact causal attention.
* ``MxKVCache``: the mxkv slot format of the KV-cache work, through the CPU reference runtime
  ``mxserve_kernels.attention.reference.QuantizedKVCache`` (one per layer): 2/4/8-bit or ternary codes, FP
  sink and window tokens, per-layer clip ratios and channel permutations from ``quantization_config.kv``.

``make_cache_factory(kind, kv_config)`` picks the class for ``--kv-cache-dtype``.
"""
from __future__ import annotations

from typing import Callable

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
UNIFORM_KV = {"int8": 8, "int4": 4, "int2": 2}


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q: [t, heads, D] at absolute ``positions`` [t]; k, v: [L, kv_heads, D] (GQA) -> [t, heads, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) * scale                     # [heads, t, L]
    future = torch.arange(k.shape[0])[None, :] > positions[:, None]           # [t, L]
    probs = torch.softmax(scores.masked_fill(future[None], float("-inf")).float(), dim=-1).to(q.dtype)
    return torch.einsum("htl,lhd->thd", probs, v)


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

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Store this step's k, v ([t, kv_heads, D]) and return causal attention of q ([t, heads, D])."""
        kk, vv = self.append(layer, k, v)
        return causal_attention(q, kk, vv, positions, scale)

    def nbytes(self) -> int:
        """Bytes of stored K/V rows (live rows, not spare capacity)."""
        if not self._k:
            return 0
        kvh, d = self._k[0].shape[1:]
        return 2 * kvh * d * self._k[0].element_size() * sum(self._len)


class MxKVCache:
    """One sequence's KV cache in the mxkv slot format (``mxserve.kvcache.config.KVQuantConfig``).

    Args:
        cfg: the KV quantization config (per-layer bits, groups, clips, permutations; sink and window sizes).
        kv_heads, head_dim: geometry (validated against ``cfg``).
        compute_dtype: dtype of attention outputs.
    """

    def __init__(self, cfg, layers: int, kv_heads: int, head_dim: int, compute_dtype: torch.dtype):
        from mxserve_kernels.attention.reference import QuantizedKVCache as RefCache
        cfg.validate_model(layers, kv_heads, head_dim)
        self.compute_dtype = compute_dtype
        self._fmts = [cfg.layer(i).slot_format(head_dim) for i in range(layers)]
        perm = (lambda p: None if p is None else torch.tensor(p, dtype=torch.int64))
        self._layers = [RefCache(f, kv_heads, sink=cfg.sink_tokens, window=cfg.window_tokens,
                                 k_perm=perm(lc.k_perm), v_perm=perm(lc.v_perm), k_clip=lc.k_clip, v_clip=lc.v_clip)
                        for f, lc in zip(self._fmts, (cfg.layer(i) for i in range(layers)))]
        self._kvh, self._d = kv_heads, head_dim
        self.precision = "mxkv"

    @property
    def bits_per_element(self) -> float:
        return sum(f.bits_per_element() for f in self._fmts) / len(self._fmts)

    def __len__(self) -> int:
        return self._layers[0].length(0) if self._layers else 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scale: float) -> torch.Tensor:
        ref = self._layers[layer]
        ref.append(0, k.float(), v.float())
        return ref.attend(0, q.float(), scale).to(self.compute_dtype)

    def nbytes(self) -> int:
        """Packed slots plus the full-precision sink/window copies (fp32 here; 2 bytes each on a GPU)."""
        total = 0
        for ref in self._layers:
            if 0 in ref._slots:
                total += ref._slots[0].numel()
                _, fk, fv = ref._fp[0]
                sk, sv = ref._sink[0]
                total += sum(t.numel() * t.element_size() for t in (fk, fv, sk, sv))
        return total


def make_cache(layers: int, kv_heads: int, head_dim: int, compute_dtype: torch.dtype) -> KVCache:
    """Default cache: bf16 storage."""
    return KVCache(layers, kv_heads, head_dim, compute_dtype)


def make_cache_factory(kind: str, kv_config=None) -> Callable:
    """Cache factory for ``--kv-cache-dtype``.

    Args:
        kind: ``auto`` (the checkpoint's ``quantization_config.kv`` if it has one, else bf16) | ``bf16`` | ``fp16``
            | ``fp32`` | ``mxkv`` (the checkpoint's config, required) | ``int8`` / ``int4`` / ``int2`` (uniform
            mxkv K and V bits, uncalibrated).
        kv_config: the checkpoint's ``KVQuantConfig`` or None.
    Returns:
        ``factory(layers, kv_heads, head_dim, compute_dtype) -> cache``.
    """
    if kind == "auto":
        kind = "mxkv" if kv_config is not None else "bf16"
    if kind in _DTYPES:
        dt = _DTYPES[kind]
        return lambda layers, kvh, d, cdt: KVCache(layers, kvh, d, cdt, dt)
    if kind == "mxkv":
        if kv_config is None:
            raise ValueError("--kv-cache-dtype mxkv: the checkpoint has no quantization_config.kv "
                             "(run `mxserve calibrate-kv` or pick int2/int4/int8)")
        return lambda layers, kvh, d, cdt: MxKVCache(kv_config, layers, kvh, d, cdt)
    if kind in UNIFORM_KV:
        from mxserve.kvcache.config import KVQuantConfig
        bits = UNIFORM_KV[kind]

        def factory(layers, kvh, d, cdt):
            g = max(x for x in (128, 64, 32, 16, 8, 4) if d % x == 0 and (x * bits) % 8 == 0)
            return MxKVCache(KVQuantConfig.uniform(layers, bits, bits, g, g), layers, kvh, d, cdt)
        return factory
    raise ValueError(f"--kv-cache-dtype {kind!r}: expected auto, bf16, fp16, fp32, mxkv, int8, int4 or int2")
