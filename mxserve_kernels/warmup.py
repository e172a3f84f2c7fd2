"""Compile every Triton variant a served model can launch before it serves (not in the first requests).

Triton compiles one binary per specialization key of a launch (``triton/runtime/jit.py``: ``create_function_from_
signature`` + ``native_specialize_impl``): every constexpr (launch config, MODE, KINDS, SPLIT_K, FMA, PAIRS, ...),
each pointer's dtype and 16-byte alignment, and each integer argument's type (i32 / i64), ``== 1`` (then it becomes a
constexpr) and ``% 16 == 0``. Several integer arguments depend on the token count T (``T*K`` pairs, the routing
kernel's padded rows and m-blocks, split-K partial strides), and the launch config depends on T through the tuned
table or the default buckets, so the binaries serving needs are NOT those of a few powers of two: at T = 300, K = 4,
a sweep T = 1..300 hits 37 keys where T in {1, 3, 2^i, 300} hits 17 (GPU test, session 4: 8 compiled after warm-up).

``moe_launch_keys`` / ``linear_launch_keys`` model the key of every launch at one T from the launchers' arguments
(``moe/fused_moe.py``, ``moe/grouped_gemm.py``, ``moe/routing.py``, ``quant/linear.py``); ``moe_token_counts`` /
``linear_token_counts`` sweep T = 1..max and keep the smallest T of each new key, so one forward per returned T
compiles exactly the set serving can hit (the CPU unit test checks the model against Triton's own key function on
the real launch arguments; the GPU test checks that a sweep compiles nothing new). ``warm_moe`` / ``warm_linear`` run
those forwards with dummy inputs once per distinct weight signature (layers with the same shapes and kinds share
binaries), then free the scratch. Binaries land in Triton's disk cache: later starts only load them.
"""
from __future__ import annotations

import torch

_WARMED: set[tuple] = set()


def _spec(v: int) -> tuple[bool, bool, bool]:
    """What Triton keys an int argument on: (== 1, % 16 == 0, needs 64 bits)."""
    return v == 1, v % 16 == 0, not -(2 ** 31) <= v < 2 ** 31


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _dequant_applies(pw, big: bool, dtype: torch.dtype) -> bool:
    """The prefill path's condition (``fused_moe._prefill_weights`` / ``dequant_linear``) given the rows test."""
    from mxserve_kernels._common.layout import OFF_UNIT
    return bool(big and dtype != torch.float32 and pw.kinds_mask & ~1 and (pw.k * pw.n) % OFF_UNIT == 0)


def _gemm_keys(pw, cfg: dict, mode: int, rows: int, kinds: int, a_div: int) -> list[tuple]:
    """Keys of one ``grouped_gemm`` call (+ its split-K reduce): rows = num_valid = out_rows."""
    from mxserve_kernels.moe.grouped_gemm import _cfg_list, _split_k
    splits = _split_k(pw.k, int(cfg.get("SPLIT_K", 1)))[1]
    n_out = pw.n // 2 if mode == 1 else pw.n
    # num_valid (= rows) and the partials' stride are do_not_specialize: no T-dependent part in the keys
    keys = [("grouped_gemm", mode, kinds, a_div == 1, tuple(_cfg_list(cfg, pw)))]
    if splits > 1 and rows * n_out:
        keys.append(("splitk_reduce", mode, splits, _spec(n_out)))
    return keys


def moe_launch_keys(w, top_k: int, t: int, dtype: torch.dtype = torch.bfloat16, *, has_map: bool = False,
                    ids_dtype: torch.dtype = torch.int32) -> set[tuple]:
    """Model of the Triton specialization keys ``fused_moe`` launches at T tokens (default config path).

    Args:
        w: ``MoEWeights``. top_k: K. t: T >= 1. dtype: activation dtype.
        has_map: an expert_map is passed (EP). ids_dtype: topk_ids dtype (vLLM: int32).
    Returns:
        set of hashable keys, one per (kernel, binary): equal keys share one compiled binary.
    """
    from mxserve_kernels.moe import routing_kernels
    from mxserve_kernels.moe.fused_moe import PREFILL_DEQUANT_ROWS, moe_config
    e, tk = w.num_experts, t * top_k
    cfg = moe_config(w, t, top_k)
    bm = cfg["w13"]["BLOCK_M"]
    keys: set[tuple] = set()
    if tk <= routing_kernels.MAX_PAIRS:  # one-launch Triton routing (larger batches: torch ops, no Triton)
        keys.add(("moe_align", has_map, str(ids_dtype), max(16, _p2(tk)), bm))  # its T-dependent ints: not specialized
    big = tk / max(e, 1) >= PREFILL_DEQUANT_ROWS and not cfg["w13"].get("INLOOP")  # tuned: in-loop dequant wins
    for name, mode, a_div in (("w13", 1, top_k), ("w2", 2, 1)):
        pw = getattr(w, name)
        kinds = pw.kinds_mask
        if _dequant_applies(pw, big, dtype):
            keys.add(("dequant_bf16", name, kinds))
            kinds = 1 if kinds else 0
        keys.update(_gemm_keys(pw, cfg[name], mode, tk, kinds, a_div))
    return keys


def linear_launch_keys(lw, m: int, dtype: torch.dtype = torch.bfloat16) -> set[tuple]:
    """Model of the keys ``dequant_linear`` launches at M rows (same contract as ``moe_launch_keys``)."""
    from mxserve_kernels.quant.linear import LINEAR_DEQUANT_ROWS, linear_config
    kinds = lw.kinds_mask
    keys: set[tuple] = set()
    if _dequant_applies(lw, m >= LINEAR_DEQUANT_ROWS, dtype):
        keys.add(("dequant_bf16", "w", kinds))
        kinds = 1 if kinds else 0
    keys.update(_gemm_keys(lw, linear_config(lw, m), 0, m, kinds, 1))
    return keys


def _first_hits(max_tokens: int, keys_at) -> list[int]:
    if max_tokens < 1:
        raise ValueError(f"warmup: max_tokens must be >= 1, got {max_tokens}")
    seen: set = set()
    out = []
    for t in range(1, max_tokens + 1):
        new = keys_at(t) - seen
        if new:
            out.append(t)
            seen |= new
    return out


def moe_token_counts(w, top_k: int, max_tokens: int, dtype: torch.dtype = torch.bfloat16, **kw) -> list[int]:
    """Smallest T in 1..max_tokens of every distinct ``moe_launch_keys`` key (ascending; T = 1 always first).
    Running ``fused_moe`` once at each compiles every binary any T <= max_tokens can launch."""
    return _first_hits(max_tokens, lambda t: moe_launch_keys(w, top_k, t, dtype, **kw))


def linear_token_counts(lw, max_tokens: int, dtype: torch.dtype = torch.bfloat16) -> list[int]:
    """Smallest M in 1..max_tokens of every distinct ``linear_launch_keys`` key (ascending)."""
    return _first_hits(max_tokens, lambda m: linear_launch_keys(lw, m, dtype))


def _spread_ids(t: int, k: int, e: int, device, dtype=torch.int32) -> torch.Tensor:
    """[T, K] distinct expert ids per token, spread over all experts (every expert gets rows at large T)."""
    base = (torch.arange(t, device=device)[:, None] * k + torch.arange(k, device=device)[None, :]) % e
    return base.to(dtype)


def warm_moe(w, top_k: int, max_tokens: int, dtype: torch.dtype = torch.bfloat16, *,
             expert_map: torch.Tensor | None = None, ids_dtype: torch.dtype = torch.int32) -> int:
    """Run ``fused_moe`` at every T of ``moe_token_counts`` (CUDA only). Returns the number of forwards run
    (0 when this weight signature was warmed already or the weights are not on a CUDA device).

    Args:
        w: ``MoEWeights`` on the device. top_k: experts per token (K <= E).
        max_tokens: the largest T the server runs (vLLM's max_num_batched_tokens).
        dtype: activation dtype. expert_map: [E_global] global -> local ids as serving passes it (EP), or None.
        ids_dtype: dtype of the router's topk_ids (vLLM: int32).
    """
    from mxserve_kernels._common import configs
    from mxserve_kernels.moe.fused_moe import fused_moe
    dev = w.w13.qw.device
    if dev.type != "cuda":
        return 0
    k = min(top_k, w.num_experts)
    e_ids = w.num_experts if expert_map is None else expert_map.numel()
    key = ("moe", dev.index, dtype, w.num_experts, w.hidden, w.inter, k, w.w13.kinds_mask, w.w2.kinds_mask,
           configs.projection_bits(w.w13), configs.projection_bits(w.w2), max_tokens, expert_map is not None,
           ids_dtype)  # the widths pick the tuned config entries (``configs.lookup(..., bits=)``)
    if key in _WARMED:
        return 0
    counts = moe_token_counts(w, k, max_tokens, dtype, has_map=expert_map is not None, ids_dtype=ids_dtype)
    with torch.no_grad():
        for t in counts:
            x = torch.zeros(t, w.hidden, dtype=dtype, device=dev)
            tw = torch.full((t, k), 1.0 / k, dtype=torch.float32, device=dev)
            fused_moe(x, w, tw, _spread_ids(t, k, e_ids, dev, ids_dtype), expert_map=expert_map)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    _WARMED.add(key)
    return len(counts)


def warm_linear(lw, max_tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Run ``dequant_linear`` at every M of ``linear_token_counts`` (CUDA only); same contract as warm_moe.

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
    counts = linear_token_counts(lw, max_tokens, dtype)
    with torch.no_grad():
        for m in counts:
            dequant_linear(torch.zeros(m, lw.k, dtype=dtype, device=dev), lw)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    _WARMED.add(key)
    return len(counts)
