"""vLLM 0.26 attention backend over the packed mxserve KV cache (the TurboQuant pattern, vllm-0.26.md §4).

Cache per layer: uint8 ``[num_blocks, P, H_kv, slot_bytes]`` (``mxserve_kernels.attention.kv_format``);
``MxKVSpec.real_page_size_bytes`` = P * H_kv * slot_bytes, so vLLM's "GPU KV cache size: N tokens" counts the real
packed pages. ``--kv-cache-dtype auto``; the backend and spec are installed per layer by ``MxKVCacheMethod``.

Lifecycle per step: ``do_kv_cache_update`` (its own op) quantizes + stores the new tokens; ``forward`` then runs
(1) decode requests: split-K Triton decode over packed positions [0, seq_len-1) plus the current token in full
precision (past-only), CUDA-graph safe (UNIFORM_SINGLE_TOKEN_DECODE); (2) prefill requests: new tokens in full
precision + cached context dequantized (``mxserve_kernels.attention.prefill``).

v1 limits (docs/kv-cache.md): the FP sink/window zones exist in the reference/embedded runtime, not yet in vLLM
(they need a per-request fp store: the planned HMA sliding-window shadow group); layers with different bits share
the largest slot size (vLLM needs one page size per KV group).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionMetadata,
                                       AttentionMetadataBuilder, AttentionType, MultipleOf)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import FullAttentionSpec

from mxserve_kernels.attention import decode, kv_store, prefill
from mxserve_kernels.attention.kv_format import KVSlotFormat



@dataclass(frozen=True, kw_only=True)
class MxKVSpec(FullAttentionSpec):
    """FullAttentionSpec whose page holds packed slots: page = block_size * num_kv_heads * slot_bytes."""

    slot_bytes: int = 0

    @property
    def real_page_size_bytes(self) -> int:
        if self.slot_bytes > 0:
            return self.block_size * self.num_kv_heads * self.slot_bytes
        return super().real_page_size_bytes

    @classmethod
    def merge(cls, specs):
        merged = super().merge(specs)
        if any(s.slot_bytes != specs[0].slot_bytes for s in specs):
            raise ValueError(f"MxKVSpec.merge: slot sizes differ {sorted({s.slot_bytes for s in specs})}")
        return replace(merged, slot_bytes=specs[0].slot_bytes)


class MxKVBackend(AttentionBackend):
    """Packed 2/4/8-bit K, ternary/2/4/8-bit V paged attention (name CUSTOM: registered via register_backend)."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [16, 32, 64, 128]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @staticmethod
    def get_impl_cls():
        return MxKVImpl

    @staticmethod
    def get_builder_cls():
        return MxKVMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        # MxKVSpec carries head_size = slot_bytes (dtype uint8), as TurboQuant's spec carries its slot size
        return (num_blocks, block_size, num_kv_heads, head_size)


@dataclass
class MxKVMetadata(AttentionMetadata):
    seq_lens: torch.Tensor          # [B] total tokens incl. this step's
    block_table: torch.Tensor       # [B, max_pages]
    query_start_loc: torch.Tensor   # [B+1]
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None


class MxKVMetadataBuilder(AttentionMetadataBuilder[MxKVMetadata]):
    """Decodes first (reorder threshold 1); only uniform single-token decode batches are graph-captured."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False) -> MxKVMetadata:
        cam = common_attn_metadata
        nd, _, ndt, _ = split_decodes_and_prefills(cam, decode_threshold=self.reorder_batch_threshold)
        seq_cpu = cam.seq_lens_cpu_upper_bound  # exact for prefill rows (the only rows read on the host)
        if seq_cpu is None and ndt < cam.num_actual_tokens:
            seq_cpu = cam.seq_lens.cpu()  # prefill batches are never graph-captured: a sync is fine here
        return MxKVMetadata(seq_lens=cam.seq_lens, block_table=cam.block_table_tensor,
                            query_start_loc=cam.query_start_loc, num_actual_tokens=cam.num_actual_tokens,
                            num_decodes=nd, num_decode_tokens=ndt, query_start_loc_cpu=cam.query_start_loc_cpu,
                            seq_lens_cpu=seq_cpu)


class MxKVImpl(AttentionImpl[MxKVMetadata]):
    """Per-layer impl; ``bind(fmt, k_perm, v_perm, k_clip, v_clip)`` is called by MxKVCacheMethod."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kw) -> None:
        if alibi_slopes is not None or sliding_window is not None or (logits_soft_cap or 0) > 0:
            raise ValueError("MxKVImpl: alibi, sliding window and logits soft-cap are not supported")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.kv_cache_dtype = kv_cache_dtype  # read by AttentionImpl.kv_quant_mode
        self.num_kv_heads = num_kv_heads or num_heads
        self.fmt: KVSlotFormat | None = None
        self.k_perm = self.v_perm = None
        self.k_clip = self.v_clip = 1.0

    def bind(self, fmt: KVSlotFormat, k_perm, v_perm, k_clip: float, v_clip: float) -> None:
        self.fmt, self.k_perm, self.v_perm, self.k_clip, self.v_clip = fmt, k_perm, v_perm, k_clip, v_clip

    def _cache(self, kv_cache: torch.Tensor) -> torch.Tensor:
        return kv_cache[..., : self.fmt.slot_bytes]  # layers with fewer bits use a prefix of the shared slot

    def _to(self, dev):
        if self.k_perm is not None and self.k_perm.device != dev:
            self.k_perm = self.k_perm.to(dev)
        if self.v_perm is not None and self.v_perm.device != dev:
            self.v_perm = self.v_perm.to(dev)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        n = slot_mapping.shape[0]
        if n <= 0:
            return
        self._to(key.device)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        kv_store.store_kv(self._cache(kv_cache), k, v, slot_mapping, self.fmt, self.k_perm, self.v_perm,
                          self.k_clip, self.v_clip)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        t = query.shape[0]
        if output is None:
            output = torch.empty(t, self.num_heads * self.head_size, dtype=query.dtype, device=query.device)
        if attn_metadata is None:
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        out = output[:n].view(n, self.num_heads, self.head_size)
        q = query[:n].view(n, self.num_heads, self.head_size)
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        cache = self._cache(kv_cache)
        self._to(q.device)
        nd, ndt = attn_metadata.num_decodes, attn_metadata.num_decode_tokens
        if nd > 0:
            seq = attn_metadata.seq_lens[:nd]
            lo = torch.zeros_like(seq)
            # past-only: the current token (already stored packed) is read in full precision from key/value.
            # k and v are views into different buffers (e.g. k after q/k-norm, v a slice of qkv): the kernel
            # wants one fp stride set, so copy the ndt current tokens (tiny, graph-safe).
            fk = k[:ndt].contiguous().unsqueeze(1)
            fv = v[:ndt].contiguous().unsqueeze(1)
            decode.paged_decode_attention(  # num_splits None: auto, from the batch shape only (graphs)
                q[:ndt], cache, attn_metadata.block_table[:nd], lo, seq - 1, fk, fv, torch.ones_like(seq),
                self.fmt, self.scale, self.k_perm, self.v_perm, num_splits=None, out=out[:ndt])
        if ndt < n:
            qsl = attn_metadata.query_start_loc_cpu[nd:] - ndt
            seq_cpu = attn_metadata.seq_lens_cpu[nd:]
            ctx = seq_cpu - (qsl[1:] - qsl[:-1])
            prefill.paged_prefill_attention(q[ndt:], k[ndt:], v[ndt:], qsl, ctx, cache,
                                            attn_metadata.block_table[nd:], self.fmt, self.scale, self.k_perm,
                                            self.v_perm, out=out[ndt:])
        return output


def register() -> None:
    """Point vLLM's CUSTOM attention backend at MxKVBackend in this process (idempotent, no CUDA)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    register_backend(AttentionBackendEnum.CUSTOM, f"{MxKVBackend.__module__}.{MxKVBackend.__qualname__}")
