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
* TTFT: one prompt of ``input_len`` tokens, one output token (the ``vllm bench latency --output-len 1`` proxy),
  ``ttft_iters`` timed calls after ``warmup`` untimed ones, distinct prompts; p50 / p99 / mean.

Time budget: with ``--budget-s`` (the caller's per-variant timeout minus a margin, ``plan_budget_s``) the runner
shares what is left after start-up between the batch sizes in proportion to their estimated work
(``estimate_call_s``) and stops repeating at a batch's share (at least one repeat; the window is then flagged
``short``), so a slow variant still finishes with every batch size measured instead of being killed.

Weight memory is vLLM's "Model loading took X GiB" log line, which the engine-core process prints: the caller
(``mxserve.cli.bench``) runs this module as a subprocess and parses its log.

Usage::

    python -m mxserve.vllm_plugin.bench_runner --model DIR [--quantization mxmoe] --batch-sizes 1,8,32,256 \\
        --input-len 128 --output-len 512 --budget-s 300 --json OUT.json
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
                  min_repeats: int = 3, ttft_iters: int = 30, warmup: int = 3) -> float:
    """Per-variant timeout derived from the work: start-up + every batch size + TTFT calls + 30 s margin."""
    ttft = (ttft_iters + warmup) * (0.05 + estimate_call_s(layers, 1, input_len, 1))
    work = sum(estimate_batch_s(layers, b, input_len, output_len, min_window_s, min_repeats) for b in batch_sizes)
    return estimate_startup_s(layers) + work + ttft + 30.0


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


def measure(llm, a: argparse.Namespace, deadline: float | None = None) -> dict:
    """Run the throughput sweep and the TTFT loop on a started ``vllm.LLM``; returns the result dict.

    Args:
        deadline: ``time.perf_counter()`` value by which everything must be done (None: no budget).
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
    ttft_s = (a.warmup + a.ttft_iters) * (0.05 + estimate_call_s(layers, 1, a.input_len, 1))
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
        w = _time_batch(llm, b, a, sp, vocab, rng, share)
        res["throughput"][b] = w["tok_s"]
        res["elapsed_s"][b] = w["window_s"]
        res["windows"][b] = w
        print(f"[bench_runner] B={b}: {w['tok_s']:,.0f} output tok/s (median of {len(w['repeats_tok_s'])}, "
              f"{w['window_s']:.1f} s, spread {100 * w['spread']:.1f}%{', SHORT' if w['short'] else ''})",
              flush=True)
    one = SamplingParams(max_tokens=1, detokenize=False)
    lat = []
    for i, p in enumerate(random_prompts(a.warmup + a.ttft_iters, a.input_len, vocab, rng)):
        t = time.perf_counter()
        llm.generate([p], one, use_tqdm=False)
        if i >= a.warmup:
            lat.append(time.perf_counter() - t)
    res.update(ttft_ms=1000 * statistics.mean(lat), ttft_p50_ms=1000 * percentile(lat, 50),
               ttft_p99_ms=1000 * percentile(lat, 99), ttft_n=len(lat))
    print(f"[bench_runner] TTFT p50 {res['ttft_p50_ms']:.1f} ms, p99 {res['ttft_p99_ms']:.1f} ms "
          f"(n={len(lat)})", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from vllm import LLM

    batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x]
    kwargs = dict(model=a.model, tokenizer=a.model, load_format=a.load_format, quantization=a.quantization,
                  max_model_len=a.max_model_len or a.input_len + a.output_len + 64, max_num_seqs=max(batch_sizes),
                  gpu_memory_utilization=a.gpu_memory_utilization, seed=a.seed, enable_prefix_caching=False)
    kwargs.update(json.loads(a.engine_json))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    print(f"[bench_runner] engine up in {startup:.1f} s", flush=True)
    res = measure(llm, a, None if a.budget_s is None else _T0 + a.budget_s)
    res.update(startup_s=startup, total_s=time.perf_counter() - _T0, budget_s=a.budget_s,
               engine_kwargs={k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")})
    write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
