"""One benchmark variant in ONE vLLM engine: output tok/s per batch size and TTFT (``mxserve bench e2e`` worker).

``vllm bench throughput`` / ``latency`` start a fresh engine per call (torch.compile + CUDA-graph capture each time,
~1 min); the e2e comparison needs 5 variants x (3-4 batch sizes + TTFT), so this runner starts the engine once per
variant and measures everything in it:

* throughput at batch B: B random-token prompts of ``input_len`` tokens, ``output_len`` output tokens each
  (``ignore_eos``, temperature 1, no detokenization), all submitted at once with ``max_num_seqs >= B``; output tok/s =
  output tokens / wall time of the ``generate`` call (prefill included, as ``vllm bench throughput`` reports it);
* TTFT: one prompt of ``input_len`` tokens, one output token (the ``vllm bench latency --output-len 1`` proxy),
  ``ttft_iters`` timed calls after ``warmup`` untimed ones, distinct prompts (prefix caching is off anyway).

Weight memory is vLLM's "Model loading took X GiB" log line, which the engine-core process prints: the caller
(``mxserve.cli.bench``) runs this module as a subprocess and parses its log.

Usage::

    python -m mxserve.vllm_plugin.bench_runner --model DIR [--quantization mxmoe] --batch-sizes 1,8,32 \\
        --input-len 128 --output-len 512 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from mxserve.io import write_json_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (config-only is fine: --load-format dummy)")
    p.add_argument("--quantization", default=None, help="vLLM --quantization (fp8, gptq_marlin, mxmoe) or none")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--ttft-iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--max-model-len", type=int, default=None, help="default: input + output + 64")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--engine-json", default="{}", help="extra vllm.LLM keyword arguments as a JSON object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, help="result JSON path (written atomically)")
    return p.parse_args(argv)


def random_prompts(n: int, length: int, vocab: int, rng: random.Random) -> list[dict]:
    """``n`` TokensPrompt dicts of ``length`` uniform random token ids in [10, vocab)."""
    return [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(length)]} for _ in range(n)]


def output_tokens(outputs) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def measure(llm, a: argparse.Namespace) -> dict:
    """Run the throughput sweep and the TTFT loop on a started ``vllm.LLM``; returns the result dict."""
    from vllm import SamplingParams

    vocab = llm.model_config.get_vocab_size()
    try:
        vocab = min(vocab, len(llm.get_tokenizer()))  # prompt ids the tokenizer knows
    except TypeError:
        pass
    rng = random.Random(a.seed)
    batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x]
    sp = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=a.output_len, detokenize=False)
    llm.generate(random_prompts(2, a.input_len, vocab, rng),
                 SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)  # warm-up
    res: dict = {"throughput": {}, "elapsed_s": {}}
    for b in batch_sizes:
        prompts = random_prompts(b, a.input_len, vocab, rng)
        # untimed pass at this batch's prefill size first: any kernel compiled on first use (ours or the peer's
        # Triton / autotuned kernels) is compiled here, not inside the timed window (same for every variant)
        llm.generate(random_prompts(b, a.input_len, vocab, rng),
                     SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        n = output_tokens(outs)
        if n != b * a.output_len:
            raise RuntimeError(f"batch {b}: {n} output tokens, expected {b * a.output_len} (ignore_eos)")
        res["throughput"][b] = n / dt
        res["elapsed_s"][b] = dt
        print(f"[bench_runner] B={b}: {n / dt:,.0f} output tok/s ({dt:.2f} s)", flush=True)
    one = SamplingParams(max_tokens=1, detokenize=False)
    lat = []
    for i, p in enumerate(random_prompts(a.warmup + a.ttft_iters, a.input_len, vocab, rng)):
        t = time.perf_counter()
        llm.generate([p], one, use_tqdm=False)
        if i >= a.warmup:
            lat.append(time.perf_counter() - t)
    res["ttft_ms"] = 1000 * statistics.mean(lat)
    res["ttft_p50_ms"] = 1000 * statistics.median(lat)
    print(f"[bench_runner] TTFT {res['ttft_ms']:.1f} ms (mean of {len(lat)})", flush=True)
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
    res = measure(llm, a)
    res.update(startup_s=startup, engine_kwargs={k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")})
    write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
