"""Compile every Triton variant a served model can launch before it serves (not in the first requests).

Triton compiles one binary per (constexprs, argument specialisation): our launch config is chosen per token count
T (tuned table or default, FMA or tensor-core loop, the prefill dequant path from ``PREFILL_DEQUANT_ROWS``), and
integer arguments are specialised on ``== 1`` and ``% 16 == 0``. vLLM's own warm-up (profile run, CUDA-graph
capture) covers only the token counts it happens to run, so a new prefill size compiled inside a request: seconds
of stall in the middle of serving (or of a benchmark's timed window). ``warm_moe`` / ``warm_linear`` run the
kernels once per T in ``token_counts(max_tokens)`` with dummy inputs, once per distinct weight signature (layers
with the same shapes and kinds share binaries), then free the scratch.
"""
from __future__ import annotations

import torch

_WARMED: set[tuple] = set()


def token_counts(max_tokens: int) -> list[int]:
    """Powers of two 1 .. max_tokens, plus max_tokens itself and an odd count (T = 3, not a multiple of 16)."""
    if max_tokens < 1:
        raise ValueError(f"token_counts: max_tokens must be >= 1, got {max_tokens}")
    out = {1, max_tokens}
    t = 2
    while t <= max_tokens:
        out.add(t)
        t *= 2
    if max_tokens >= 3:
        out.add(3)
    return sorted(out)


def _spread_ids(t: int, k: int, e: int, device) -> torch.Tensor:
    """[T, K] distinct expert ids per token, spread over all experts (every expert gets rows at large T)."""
    base = (torch.arange(t, device=device)[:, None] * k + torch.arange(k, device=device)[None, :]) % e
    return base.to(torch.int32)


def warm_moe(w, top_k: int, max_tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Run ``fused_moe`` at every T of ``token_counts(max_tokens)`` (CUDA only). Returns the number of forwards run
    (0 when this weight signature was warmed already or the weights are not on a CUDA device).

    Args:
        w: ``MoEWeights`` on the device. top_k: experts per token (K <= E).
        max_tokens: the largest T the server runs (vLLM's max_num_batched_tokens).
    """
    from mxserve_kernels.moe.fused_moe import fused_moe
    dev = w.w13.qw.device
    if dev.type != "cuda":
        return 0
    k = min(top_k, w.num_experts)
    key = ("moe", dev.index, dtype, w.num_experts, w.hidden, w.inter, k, w.w13.kinds_mask, w.w2.kinds_mask,
           max_tokens)
    if key in _WARMED:
        return 0
    n = 0
    with torch.no_grad():
        for t in token_counts(max_tokens):
            x = torch.zeros(t, w.hidden, dtype=dtype, device=dev)
            tw = torch.full((t, k), 1.0 / k, dtype=torch.float32, device=dev)
            fused_moe(x, w, tw, _spread_ids(t, k, w.num_experts, dev))
            n += 1
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    _WARMED.add(key)
    return n


def warm_linear(lw, max_tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Run ``dequant_linear`` at every M of ``token_counts(max_tokens)`` (CUDA only); same contract as warm_moe.

    Args:
        lw: ``LinearWeights`` (a ``PackedWeights``: qw, n, k, kinds_mask) on the device.
    """
    from mxserve_kernels.quant.linear import dequant_linear
    dev = lw.qw.device
    if dev.type != "cuda":
        return 0
    key = ("linear", dev.index, dtype, lw.n, lw.k, lw.kinds_mask, max_tokens)
    if key in _WARMED:
        return 0
    n = 0
    with torch.no_grad():
        for t in token_counts(max_tokens):
            dequant_linear(torch.zeros(t, lw.k, dtype=dtype, device=dev), lw)
            n += 1
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    _WARMED.add(key)
    return n
