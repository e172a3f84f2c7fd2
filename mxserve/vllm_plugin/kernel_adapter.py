"""One seam between the vLLM methods and ``mxserve_kernels``: kernel layouts when the kernels package provides them,
the pure-PyTorch reference path otherwise (CPU contract tests, ``MXSERVE_DISABLED_KERNELS``).

Kernel API (kernels engineer): ``mxserve_kernels.quant.prepare_linear(scheme, tensors, k=K, device=...)`` ->
``LinearWeights``; ``dequant_linear(x, lw, bias=None)``; ``mxserve_kernels.moe.prepare_experts(gate_up=[(scheme,
tensors)]*E, down=[...], hidden=H, inter=I)`` -> ``MoEWeights``; ``fused_moe(x, w, topk_weights, topk_ids,
activation="silu", expert_map=None)``.

The reference objects keep the canonical tensors (no dense copy) and dequantize on every call; they are graph-safe
(no host sync) so CUDA-graph capture works, but slow: they exist for correctness, not speed.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mxserve import envs
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant.reference import dequantize

logger = logging.getLogger("mxserve")

Tensors = dict[str, torch.Tensor]


def _kernel_fn(module: str, name: str, backend: str):
    """The kernels package's function, or None when absent or disabled via MXSERVE_DISABLED_KERNELS."""
    if backend in envs.disabled_kernels() or "all" in envs.disabled_kernels():
        return None
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


@dataclass
class RefLinear:
    """Reference linear: canonical tensors of one [N, K] weight, dequantized per call."""

    scheme: WeightScheme
    tensors: Tensors
    k: int

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, K] -> [T, N] in x.dtype (fp32 dequant + fp32 GEMM)."""
        w = dequantize(self.scheme, self.tensors, self.k, out_dtype=torch.float32)
        y = F.linear(x.float(), w, None if bias is None else bias.float())
        return y.to(x.dtype)


@dataclass
class RefExperts:
    """Reference experts: per local expert e, canonical gate_up [2I, H] and down [H, I] tensors."""

    gate_up: list[tuple[WeightScheme, Tensors]]
    down: list[tuple[WeightScheme, Tensors]]
    hidden: int
    inter: int

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                expert_map: torch.Tensor | None) -> torch.Tensor:
        """x [T, H], topk_weights/ids [T, K] (global ids) -> [T, H]. Dense over tokens: no data-dependent shapes."""
        ids = topk_ids.long()
        if expert_map is not None:
            ids = expert_map.long()[ids]          # -1 for experts owned by another EP rank
        xf = x.float()
        out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        for e, ((sg, tg), (sd, td)) in enumerate(zip(self.gate_up, self.down)):
            w_tok = (topk_weights.float() * (ids == e)).sum(-1)  # [T]
            h = xf @ dequantize(sg, tg, self.hidden).t()            # [T, 2I]
            a = F.silu(h[:, : self.inter]) * h[:, self.inter:]
            y = a @ dequantize(sd, td, self.inter).t()              # [T, H]
            out += w_tok[:, None] * y
        return out.to(x.dtype)


def prepare_linear(scheme: WeightScheme, tensors: Tensors, k: int, device: torch.device):
    """Canonical tensors of one [N, K] weight -> kernel-layout object (or RefLinear)."""
    fn = _kernel_fn("mxserve_kernels.quant", "prepare_linear", "triton_dequant")
    if fn is not None:
        return fn(scheme, tensors, k=k, device=device)
    return RefLinear(scheme, {n: t.to(device) for n, t in tensors.items()}, k)


def linear_forward(x: torch.Tensor, lw, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias for a prepared linear. x [T, K] -> [T, N]."""
    if isinstance(lw, RefLinear):
        return lw.forward(x, bias)
    from mxserve_kernels.quant import dequant_linear
    return dequant_linear(x, lw, bias=bias)


def prepare_experts(gate_up: list[tuple[WeightScheme, Tensors]], down: list[tuple[WeightScheme, Tensors]],
                    hidden: int, inter: int):
    """Per-local-expert canonical tensors (gate_up = row-concat(gate, up)) -> kernel-layout MoE weights."""
    fn = _kernel_fn("mxserve_kernels.moe", "prepare_experts", "triton_moe")
    if fn is not None:
        return fn(gate_up=gate_up, down=down, hidden=hidden, inter=inter)
    return RefExperts(gate_up, down, hidden, inter)


def experts_forward(x: torch.Tensor, w, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    expert_map: torch.Tensor | None, activation: str = "silu") -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) over local experts. x [T, H] -> [T, H]."""
    if activation != "silu":
        raise ValueError(f"mxmoe: MoE activation {activation!r} is not supported (silu only)")
    if isinstance(w, RefExperts):
        return w.forward(x, topk_weights, topk_ids, expert_map)
    from mxserve_kernels.moe import fused_moe
    return fused_moe(x, w, topk_weights, topk_ids, activation=activation, expert_map=expert_map)


def _serve_shape() -> tuple[int, torch.dtype]:
    """(largest tokens per forward, activation dtype) of the vLLM config being loaded (8192, bf16 without one)."""
    from vllm.config import get_current_vllm_config_or_none
    cfg = get_current_vllm_config_or_none()
    if cfg is None:
        return 8192, torch.bfloat16
    max_t = int(getattr(cfg.scheduler_config, "max_num_batched_tokens", 8192) or 8192)
    dtype = getattr(cfg.model_config, "dtype", torch.bfloat16) if cfg.model_config is not None else torch.bfloat16
    return max_t, dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def warm_kernels(obj, top_k: int | None = None, expert_map: torch.Tensor | None = None) -> int:
    """Compile the kernel variants of a prepared layer before serving (``mxserve_kernels.warmup``: one forward per
    distinct Triton specialization key any T <= max_num_batched_tokens can launch); no-op for the reference
    objects, off the GPU, or with MXSERVE_KERNEL_WARMUP=0. Returns the number of warm-up forwards.

    Args:
        obj: prepared linear (top_k None) or MoE weights. top_k: experts per token (MoE).
        expert_map: the layer's [E_global] global -> local map under EP (as ``apply`` passes it), else None.
    """
    if isinstance(obj, (RefLinear, RefExperts)) or not envs.kernel_warmup():
        return 0
    from mxserve_kernels import warmup
    max_t, dtype = _serve_shape()
    t0 = time.perf_counter()
    try:
        if top_k is None:
            n = warmup.warm_linear(obj, max_t, dtype)
        else:
            n = warmup.warm_moe(obj, top_k, max_t, dtype, expert_map=expert_map)
    except torch.cuda.OutOfMemoryError as exc:  # an optimisation only: serving compiles lazily instead
        logger.warning("mxmoe: kernel warm-up skipped (%s); kernels compile on first use", exc)
        torch.cuda.empty_cache()
        return 0
    if n:
        logger.info("mxmoe: kernel warm-up of a %s signature: %d forwards (T <= %d) in %.1f s",
                    "linear" if top_k is None else "MoE", n, max_t, time.perf_counter() - t0)
    return n
