"""vLLM's unquantized linear / embedding methods, plus weight metrics (``weight_stats``) after loading.

The mxmoe config hands these to bf16 linears (routers, shared-expert gate, layers the plan keeps in bf16) and to
embeddings / lm_head, so ``mxserve:worker_weight_bytes`` covers the whole model, not only the quantized layers.
Behaviour is exactly vLLM's (``super()`` does all the work; the subclasses pass vLLM's isinstance checks).
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from mxserve.vllm_plugin import weight_stats


class _RecordsBytes:
    """Mixin: after vLLM's own processing, record the layer's bytes. Args: prefix (vLLM name), plan_cfg."""

    def __init__(self, prefix: str, plan_cfg) -> None:
        super().__init__()
        self.prefix, self.plan_cfg = prefix, plan_cfg

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        super().process_weights_after_loading(layer)
        weight_stats.record_unquantized(self.prefix, layer, self.plan_cfg)


class CountedUnquantizedLinearMethod(_RecordsBytes, UnquantizedLinearMethod):
    """``UnquantizedLinearMethod`` that records the layer's bytes."""


class CountedUnquantizedEmbeddingMethod(_RecordsBytes, UnquantizedEmbeddingMethod):
    """``UnquantizedEmbeddingMethod`` that records the table's bytes (a tied lm_head is counted once)."""
