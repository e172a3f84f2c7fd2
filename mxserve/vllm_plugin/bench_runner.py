"""One benchmark variant in ONE vLLM engine: output tok/s per batch size and TTFT (``mxserve bench e2e`` worker).

``vllm bench throughput`` / ``latency`` start a fresh engine per call (torch.compile + CUDA-graph capture each time,
~1 min); the e2e comparison needs 5 variants x (3-4 batch sizes + TTFT), so this runner starts the engine once per
variant and measures everything in it:

* throughput at batch B: an untimed pass at B first (4 output tokens: kernels compiled on first use are compiled
  there, not in the timed window), then timed repeats, each ``generate`` of B random-token prompts of ``input_len``
  tokens x ``output_len`` output tokens (``ignore_eos``, temperature 1, no detokenization), all in flight at once
  (``max_num_seqs >= B``), prefill included as ``vllm bench throughput`` counts it. Repeats run until the measured
  window (their summed wall time) is >= ``min_window_s`` AND there were >= ``min_repeats`` of them (a 1-s window
  swung +-15% between runs); reported tok/s = the median repeat, with ``spread`` = (max - min) / median;
* TTFT: one prompt of ``ttft_input_len`` tokens (default ``input_len``; the offload comparison uses 2048), one
  output token (the ``vllm bench latency --output-len 1`` proxy), ``ttft_iters`` timed calls after ``warmup``
  untimed ones, distinct prompts; p50 / p99 / mean, and ``prefill_tok_s`` = ttft_input_len / p50;
* expert-offload counters (``--offload-stats``, mxmoe variants with an ``offload`` section): the engine core owns
  the ``ExpertCache``, so the runner loads ``OffloadStatsExtension`` into vLLM's worker (``worker_extension_cls``)
  and reads ``cache.stats()`` through ``llm.collective_rpc`` right before and after each batch's timed repeats and
  around the timed TTFT calls; ``stats_delta`` turns the pair into hit rate, H2D bytes and GB/s (bytes / window
  wall time: an average over the window, not the link's peak), stall seconds and the stall fraction of the window.

Time budget: with ``--budget-s`` (the caller's per-variant timeout minus a margin, ``plan_budget_s``) the runner
shares what is left after start-up between the batch sizes in proportion to their estimated work
(``estimate_call_s``) and stops repeating at a batch's share (at least one repeat; the window is then flagged
``short``), so a slow variant still finishes with every batch size measured instead of being killed.

Weight memory is vLLM's "Model loading took X GiB" log line, which the engine-core process prints: the caller
(``mxserve.cli.bench``) runs this module as a subprocess and parses its log.

Usage::

    python -m mxserve.vllm_plugin.bench_runner --model DIR [--quantization mxmoe] --batch-sizes 1,8,32,256 \\
        --input-len 128 --output-len 512 [--ttft-input-len 2048] [--offload-stats] --budget-s 300 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time

from mxserve.io import write_json_atomic

_T0 = time.perf_counter()  # process start: the budget counts imports and engine start-up too


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (config-only is fine: --load-format dummy)")
    p.add_argument("--quantization", default=None, help="vLLM --quantization (fp8, gptq_marlin, mxmoe) or none")
    p.add_argument("--batch-sizes", default="1,8,32,256")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--min-window-s", type=float, default=5.0, help="measured seconds per batch size (at least)")
    p.add_argument("--min-repeats", type=int, default=3, help="timed repeats per batch size (at least)")
    p.add_argument("--max-repeats", type=int, default=50)
    p.add_argument("--ttft-iters", type=int, default=30)
    p.add_argument("--ttft-input-len", type=int, default=None, help="prompt tokens of the TTFT calls (default: "
                   "--input-len)")
    p.add_argument("--offload-stats", action="store_true", help="read the expert cache's counters from the worker "
                   "(OffloadStatsExtension) around every timed window")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=None, help="wall seconds for the whole run (start-up included)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--max-model-len", type=int, default=None, help="default: input + output + 64")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--engine-json", default="{}", help="extra vllm.LLM keyword arguments as a JSON object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="result JSON path (written atomically)")
    return p.parse_args(argv)


# ---- work model (pessimistic H200 numbers: A3B-geometry layers, CUDA graphs; 4 layers, GPTQ W4, B=8 measured
# 2.2 ms per decode step where this gives 4.7 ms) --------------------------------------------------------------
def estimate_step_s(layers: int, batch: int) -> float:
    """Seconds of one decode step of ``batch`` sequences through ``layers`` MoE layers (upper estimate)."""
    return 3e-3 + layers * (0.4e-3 + 3e-6 * batch)


def estimate_call_s(layers: int, batch: int, input_len: int, output_len: int) -> float:
    """Seconds of one ``generate`` of ``batch`` prompts: prefill (1 us per token and layer) + output_len steps."""
    return batch * input_len * layers * 1e-6 + output_len * estimate_step_s(layers, batch)


def estimate_batch_s(layers: int, batch: int, input_len: int, output_len: int, min_window_s: float,
                     min_repeats: int) -> float:
    """Seconds the runner spends at one batch size: untimed 4-token pass + max(window, repeats x call) + 1 call."""
    call = estimate_call_s(layers, batch, input_len, output_len)
    return estimate_call_s(layers, batch, input_len, 4) + max(min_window_s, min_repeats * call) + call


def estimate_startup_s(layers: int) -> float:
    """Engine start-up allowance (dummy load + torch.compile + CUDA-graph capture): 4 layers took 45-80 s."""
    return 90.0 + 4.0 * layers


def plan_budget_s(layers: int, batch_sizes: list[int], input_len: int, output_len: int, min_window_s: float = 5.0,
                  min_repeats: int = 3, ttft_iters: int = 30, warmup: int = 3,
                  ttft_input_len: int | None = None) -> float:
    """Per-variant timeout derived from the work: start-up + every batch size + TTFT calls + 30 s margin."""
    ttft = (ttft_iters + warmup) * (0.05 + estimate_call_s(layers, 1, ttft_input_len or input_len, 1))
    work = sum(estimate_batch_s(layers, b, input_len, output_len, min_window_s, min_repeats) for b in batch_sizes)
    return estimate_startup_s(layers) + work + ttft + 30.0


# ---- expert-offload counters (read in vLLM's worker process) ------------------------------------------------------
_COUNTERS = ("hits", "misses", "bytes_moved", "prefetch_bytes", "stall_seconds", "degraded", "prefetch_issued",
             "prefetch_useful")


def _plain(x):
    """``x`` with numpy scalars / arrays, tuples and sets turned into JSON-serialisable Python values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (set, frozenset)):
        return sorted(_plain(v) for v in x)
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def offload_stats(model) -> dict | None:
    """``ExpertCache.stats()`` of the model's shared ``OffloadRuntime`` (plus the arena's pin mode / bytes), or None
    when no MoE layer offloads.

    Args:
        model: the vLLM model (``Worker.get_model()``); its modules' ``quant_method.runtime.cache`` is looked up.
    """
    for m in model.modules():
        cache = getattr(getattr(getattr(m, "quant_method", None), "runtime", None), "cache", None)
        if cache is not None:
            arena = getattr(cache, "arena", None)
            return _plain({**cache.stats(), "pin_mode": getattr(arena, "pin_mode", None),
                           "host_pinned_bytes": getattr(arena, "pinned_bytes", None)})
    return None


class OffloadStatsExtension:
    """Mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``): ``llm.collective_rpc(
    "mxserve_offload_stats")`` returns one ``offload_stats`` dict (or None) per worker."""

    def mxserve_offload_stats(self) -> dict | None:
        return offload_stats(self.get_model())


EXTENSION = "mxserve.vllm_plugin.bench_runner.OffloadStatsExtension"   # qualified name the worker imports


def stats_delta(before: dict | None, after: dict | None, seconds: float) -> dict | None:
    """Counters moved between two ``offload_stats`` reads around ``seconds`` of measured wall time.

    Returns:
        None if either read is missing, else {hits, misses, hit_rate (None without lookups), h2d_bytes,
        h2d_gbps (bytes / seconds / 1e9: the window's average), prefetch_bytes, stall_s, stall_fraction
        (stall_s / seconds), degraded, prefetch_issued, prefetch_useful, plane_mix (routed tokens per run level)}.
    """
    if not before or not after:
        return None
    d = {k: after.get(k, 0) - before.get(k, 0) for k in _COUNTERS}
    looked = d["hits"] + d["misses"]
    mix_a, mix_b = after.get("plane_mix") or {}, before.get("plane_mix") or {}
    secs = max(seconds, 1e-9)
    return {"hits": d["hits"], "misses": d["misses"], "hit_rate": d["hits"] / looked if looked else None,
            "h2d_bytes": d["bytes_moved"], "h2d_gbps": d["bytes_moved"] / secs / 1e9,
            "prefetch_bytes": d["prefetch_bytes"], "stall_s": d["stall_seconds"],
            "stall_fraction": d["stall_seconds"] / secs, "degraded": d["degraded"],
            "prefetch_issued": d["prefetch_issued"], "prefetch_useful": d["prefetch_useful"],
            "plane_mix": {k: mix_a[k] - mix_b.get(k, 0) for k in mix_a}}


# ---- measurement ------------------------------------------------------------------------------------------------
def random_prompts(n: int, length: int, vocab: int, rng: random.Random) -> list[dict]:
    """``n`` TokensPrompt dicts of ``length`` uniform random token ids in [10, vocab)."""
    return [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(length)]} for _ in range(n)]


def output_tokens(outputs) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated q-th percentile (0..100) of a non-empty list (numpy's default method)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


def _num_layers(llm) -> int:
    hf = getattr(getattr(llm, "model_config", None), "hf_config", None)
    return int(getattr(hf, "num_hidden_layers", 1) or 1)


def _time_batch(llm, b: int, a, sp, vocab: int, rng: random.Random, share_s: float | None) -> dict:
    """Timed repeats at batch b until (window >= min_window_s and repeats >= min_repeats) or the share is spent."""
    toks, window, last = [], 0.0, 0.0
    while len(toks) < a.max_repeats:
        if toks and len(toks) >= a.min_repeats and window >= a.min_window_s:
            break
        if toks and share_s is not None and window + last > share_s:
            break
        prompts = random_prompts(b, a.input_len, vocab, rng)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        last = time.perf_counter() - t
        n = output_tokens(outs)
        if n != b * a.output_len:
            raise RuntimeError(f"batch {b}: {n} output tokens, expected {b * a.output_len} (ignore_eos)")
        toks.append(n / last)
        window += last
    med = statistics.median(toks)
    return {"tok_s": med, "repeats_tok_s": toks, "window_s": window, "spread": (max(toks) - min(toks)) / med,
            "short": window < a.min_window_s or len(toks) < a.min_repeats}


def measure(llm, a: argparse.Namespace, deadline: float | None = None, stats=None) -> dict:
    """Run the throughput sweep and the TTFT loop on a started ``vllm.LLM``; returns the result dict.

    Args:
        deadline: ``time.perf_counter()`` value by which everything must be done (None: no budget).
        stats: zero-argument callable returning the expert cache's counters (``offload_stats``) or None; read
            around each batch's timed repeats and the timed TTFT calls (``res["offload"]``, ``stats_delta``).
    """
    from vllm import SamplingParams

    vocab = llm.model_config.get_vocab_size()
    try:
        vocab = min(vocab, len(llm.get_tokenizer()))  # prompt ids the tokenizer knows
    except TypeError:
        pass
    rng = random.Random(a.seed)
    batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x]
    layers = _num_layers(llm)
    sp = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=a.output_len, detokenize=False)
    llm.generate(random_prompts(2, a.input_len, vocab, rng),
                 SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)  # warm-up
    res: dict = {"throughput": {}, "elapsed_s": {}, "windows": {}}
    if stats is not None:
        res["offload"] = {}
    ttft_len = getattr(a, "ttft_input_len", None) or a.input_len
    ttft_s = (a.warmup + a.ttft_iters) * (0.05 + estimate_call_s(layers, 1, ttft_len, 1))
    weights = {b: estimate_batch_s(layers, b, a.input_len, a.output_len, a.min_window_s, a.min_repeats)
               for b in batch_sizes}
    for i, b in enumerate(batch_sizes):
        # untimed pass at this batch's prefill size first: any kernel compiled on first use (ours or the peer's
        # Triton / autotuned kernels) is compiled here, not inside the timed window (same for every variant)
        t_b = time.perf_counter()
        share = None if deadline is None else (deadline - t_b - ttft_s) * weights[b] / sum(
            weights[x] for x in batch_sizes[i:])  # this batch's part of what is left (untimed pass included)
        llm.generate(random_prompts(b, a.input_len, vocab, rng),
                     SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
        if share is not None:
            share = max(0.0, share - (time.perf_counter() - t_b))
        s0 = stats() if stats is not None else None
        w = _time_batch(llm, b, a, sp, vocab, rng, share)
        if stats is not None:
            res["offload"][b] = stats_delta(s0, stats(), w["window_s"])
        res["throughput"][b] = w["tok_s"]
        res["elapsed_s"][b] = w["window_s"]
        res["windows"][b] = w
        print(f"[bench_runner] B={b}: {w['tok_s']:,.0f} output tok/s (median of {len(w['repeats_tok_s'])}, "
              f"{w['window_s']:.1f} s, spread {100 * w['spread']:.1f}%{', SHORT' if w['short'] else ''})",
              flush=True)
    one = SamplingParams(max_tokens=1, detokenize=False)
    lat, s0 = [], None
    for i, p in enumerate(random_prompts(a.warmup + a.ttft_iters, ttft_len, vocab, rng)):
        if i == a.warmup and stats is not None:
            s0 = stats()
        t = time.perf_counter()
        llm.generate([p], one, use_tqdm=False)
        if i >= a.warmup:
            lat.append(time.perf_counter() - t)
    if stats is not None:
        res["offload_ttft"] = stats_delta(s0, stats(), sum(lat))
    res.update(ttft_ms=1000 * statistics.mean(lat), ttft_p50_ms=1000 * percentile(lat, 50),
               ttft_p99_ms=1000 * percentile(lat, 99), ttft_n=len(lat), ttft_input_len=ttft_len,
               prefill_tok_s=ttft_len / percentile(lat, 50))
    print(f"[bench_runner] TTFT ({ttft_len} tokens) p50 {res['ttft_p50_ms']:.1f} ms, p99 {res['ttft_p99_ms']:.1f} ms "
          f"(n={len(lat)})", flush=True)
    return res


def _stats_reader(llm):
    """``offload_stats`` of worker 0 through ``collective_rpc``; after a failed read it logs once and returns None
    (the tok/s measurement goes on without counters)."""
    failed = []

    def read() -> dict | None:
        if failed:
            return None
        try:
            return llm.collective_rpc("mxserve_offload_stats")[0]
        except Exception as e:  # noqa: BLE001 -- counters are optional, the throughput numbers are not
            failed.append(e)
            print(f"[bench_runner] offload counters unavailable: {e!r}", flush=True)
            return None
    return read


_SET_KWARGS = ("cpu_offload_params", "offload_params")   # EngineArgs fields typed set[str] (JSON gives lists)


def engine_kwargs(a: argparse.Namespace) -> dict:
    """``vllm.LLM`` keyword arguments of a run: the model, dummy load, quantization, ``max_model_len`` covering the
    throughput prompts and the TTFT prompt, ``max_num_seqs`` = largest B, the offload-stats worker extension, then
    ``--engine-json`` on top (its list values for set-typed fields such as ``cpu_offload_params`` become sets)."""
    batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x]
    need = max(a.input_len + a.output_len, (a.ttft_input_len or a.input_len) + 1) + 64
    kwargs = dict(model=a.model, tokenizer=a.model, load_format=a.load_format, quantization=a.quantization,
                  max_model_len=a.max_model_len or need, max_num_seqs=max(batch_sizes),
                  gpu_memory_utilization=a.gpu_memory_utilization, seed=a.seed, enable_prefix_caching=False)
    if a.offload_stats:
        kwargs["worker_extension_cls"] = EXTENSION
    extra = json.loads(a.engine_json)
    if not isinstance(extra, dict):
        raise ValueError(f"--engine-json: expected a JSON object, got {a.engine_json!r}")
    kwargs.update({k: set(v) if k in _SET_KWARGS and isinstance(v, list) else v for k, v in extra.items()})
    return kwargs


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from vllm import LLM

    kwargs = engine_kwargs(a)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    print(f"[bench_runner] engine up in {startup:.1f} s", flush=True)
    stats = _stats_reader(llm) if a.offload_stats else None
    res = measure(llm, a, None if a.budget_s is None else _T0 + a.budget_s, stats=stats)
    if stats is not None:
        res["offload_final"] = stats()
    res.update(startup_s=startup, total_s=time.perf_counter() - _T0, budget_s=a.budget_s,
               engine_kwargs=_plain({k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")}))
    write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
