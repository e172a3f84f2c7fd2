"""``mxserve bench e2e``: vLLM end-to-end throughput / latency of mxmoe vs its peers, measured in the same run.

Variants (random weights via ``--load-format dummy`` on config-only model directories, same geometry):
  bf16; fp8 (``--quantization fp8``, online); gptq_w4 (GPTQ-Marlin W4 g128 sym on attention + experts);
  mxmoe_w4 (int4 g128 asym on attention + experts); mxmoe_mix25 (experts 75% int2 / 25% int3 g128 asym = 2.5 bits
  with metadata, attention int4).
Expert offload (issue 7, docs/offload.md "End to end"): mxmoe_w4_off100 / _off50 / _off25 (nested W4 experts,
  ``NESTED_W4``, with ``quantization_config.offload``: GPU slot pool = that share of the expert bytes, HEBF,
  look-ahead 1, on_miss=base; dummy weights reach the pinned arena: ``OffloadMoEMethod`` fills the flat tensors in
  ``process_weights_after_loading`` before writing them there); vLLM's own UVA offload at the same GPU bytes for
  experts: gptq_w4_cpuoff25 / bf16_cpuoff25 (``--cpu-offload-gb`` from ``expert_memory``, ``--cpu-offload-params
  experts``). With an offload variant the pinned H2D copy bandwidth (``--pinned-gib``) is measured first, in a
  subprocess; offload rows carry the cache's counters per batch (stall fraction, H2D GB/s, hit rate) and the JSON's
  targets add off25 / all-resident W4 (>= 0.5) and off25 / gptq_w4_cpuoff25 (>= 3) at B=32.
Runner ``engine`` (default): ONE vLLM engine per variant (``python -m mxserve.vllm_plugin.bench_runner`` in a
subprocess, default torch.compile + CUDA graphs): output tok/s at each batch size B (B prompts of ``--input-len``
random tokens, ``--output-len`` output tokens, all in flight at once; timed repeats until >= ``--min-window-s``
measured and >= ``--min-repeats``: median and spread) and TTFT p50 / p99 (one prompt, one output token). The
per-variant timeout derives from the work (``bench_runner.plan_budget_s``: layers, batch sizes, lengths) unless
``--variant-timeout`` is given; the runner fits its repeats into it. ``--deadline-s`` bounds the whole command (a
variant that cannot start in time is recorded as skipped); ``mxserve bench merge`` joins the JSONs of several
calls (e.g. ``--variants`` split over 10-minute GPU calls) into one table. Runner ``vllm-bench``: ``vllm bench throughput --max-num-seqs B`` per B plus ``vllm bench latency`` (one
engine start per call: several minutes per variant). Weight memory is parsed from vLLM's "Model loading took X GiB"
log line. A failing variant is recorded with its error and the others still run; the JSON is rewritten after each
variant (atomic) and ends with the issue's targets (mxmoe W4 >= 1.0x GPTQ-W4 and the 2.5-bit mix >= 1.25x GPTQ-W4
at B <= 32; mix weights <= 0.3x bf16). ``--markdown`` gets the table appended.

Examples (H200)::

    # the issue's quick comparison, 4-layer A3B geometry (~5-7 min)
    mxserve bench e2e --preset qwen3-30b-a3b --layers 4 --batch-sizes 1,8,32 --out /tmp/e2e \
        --json $OUT/e2e.json --markdown $OUT/e2e.md
    # full geometry, split over calls, then merged
    mxserve bench e2e --preset qwen3-30b-a3b --layers 48 --variants gptq_w4,mxmoe_w4 --deadline-s 560 \
        --out /tmp/e2e --json $OUT/e2e-a.json
    mxserve bench merge e2e-a.json e2e-b.json e2e-c.json --json e2e.json --markdown e2e.md
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

from mxserve.cli.bench_offload import (  # noqa: F401
    GIB,
    NESTED_W4,
    OFFLOAD_BUDGETS,
    VLLM_OFFLOAD,
    expert_bytes,
    expert_memory,
    geometry,
    measure_pinned_gbps,
    offload_pool_bytes,
    offload_rows,
    offload_section,
    vllm_offload_kwargs,
)
from mxserve.io import write_json_atomic
from mxserve.vllm_plugin.bench_runner import estimate_startup_s, plan_budget_s

VARIANTS = ("bf16", "fp8", "gptq_w4", "mxmoe_w4", "mxmoe_mix25", *OFFLOAD_BUDGETS, *VLLM_OFFLOAD)
_OFFLOADED_RE = re.compile(r"Total CPU offloaded parameters: ([\d.]+)")
_TPUT_RE = re.compile(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s")
_MEM_RE = re.compile(r"Model loading took ([\d.]+) GiB")
_clock = time.monotonic  # wall clock of ``run`` (tests replace it)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks against vLLM peers measured in the same run")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    e = sub.add_parser("e2e", help="vLLM tok/s + TTFT: bf16, fp8, GPTQ-Marlin W4, mxmoe W4 / 2.5b, expert offload")
    e.add_argument("--preset", default="qwen3-30b-a3b", help="model geometry from mxserve.models.tiny.PRESETS")
    e.add_argument("--layers", type=int, default=48)
    e.add_argument("--out", required=True, help="work directory for the config-only model directories and logs")
    e.add_argument("--json", required=True, help="result JSON path (written atomically)")
    e.add_argument("--markdown", default=None, help="append one markdown table row per variant here")
    e.add_argument("--variants", default=",".join(VARIANTS))
    e.add_argument("--batch-sizes", default="1,8,32,256")
    e.add_argument("--input-len", type=int, default=128)
    e.add_argument("--output-len", type=int, default=512)
    e.add_argument("--min-prompts", type=int, default=8, help="num-prompts = max(min_prompts, 2*B)")
    e.add_argument("--extra", default="", help="extra arguments for every vllm bench call (one string; vllm-bench)")
    e.add_argument("--runner", choices=("engine", "vllm-bench"), default="engine",
                   help="engine: one vLLM engine per variant (fast); vllm-bench: vllm bench throughput/latency")
    e.add_argument("--engine-json", default="{}", help="extra vllm.LLM kwargs for the engine runner (JSON object)")
    e.add_argument("--min-window-s", type=float, default=5.0, help="measured seconds per batch size (engine)")
    e.add_argument("--min-repeats", type=int, default=3, help="timed repeats per batch size (engine)")
    e.add_argument("--ttft-iters", type=int, default=30)
    e.add_argument("--ttft-input-len", type=int, default=None,
                   help="prompt tokens of the TTFT calls (default --input-len; issue 7 uses 2048: prefill tok/s)")
    e.add_argument("--pinned-gib", type=float, default=1.0,
                   help="GiB of the pinned H2D copy measured before the engines when an offload variant runs (0: off)")
    e.add_argument("--variant-timeout", type=float, default=None,
                   help="seconds per variant (engine runner; default: derived from the work, plan_budget_s)")
    e.add_argument("--deadline-s", type=float, default=None,
                   help="wall seconds for the whole command: timeouts shrink to fit, variants that cannot start "
                        "in time are recorded as skipped (fit a GPU call's limit)")
    e.add_argument("--dry-run", action="store_true", help="write the model directories, print them and the budgets")
    e.set_defaults(func=run)
    m = sub.add_parser("merge", help="join e2e JSONs of several calls (same preset/layers/lengths) into one table")
    m.add_argument("inputs", nargs="+", help="e2e JSON files; a variant in several keeps the last successful one")
    m.add_argument("--json", required=True, help="merged JSON path (written atomically)")
    m.add_argument("--markdown", default=None, help="append the merged table here")
    m.set_defaults(func=run_merge)
    p.set_defaults(func=lambda a: p.print_help() or 2)


# ---- model directories -----------------------------------------------------------------------------------------
def _attn_modules(layers: int, projs=("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    return [f"model.layers.{l}.self_attn.{p}" for l in range(layers) for p in projs]


def mxmoe_plan(variant: str, layers: int, experts: int, seed: int = 0) -> dict:
    """The quantization_config of an mxmoe benchmark variant (HF names, Qwen3-MoE layout); ``mxmoe_w4_off*``:
    nested W4 experts (``NESTED_W4``) with the ``offload`` section of its budget."""
    rng = random.Random(seed)
    if variant == "mxmoe_w4":
        pick = lambda: "int4_g128_asym"  # noqa: E731
    elif variant in OFFLOAD_BUDGETS:
        pick = lambda: NESTED_W4  # noqa: E731
    elif variant == "mxmoe_mix25":
        pick = lambda: "int2_g128_asym" if rng.random() < 0.75 else "int3_g128_asym"  # noqa: E731
    else:
        raise ValueError(f"not an mxmoe variant: {variant!r}")
    experts_plan = {}
    for l in range(layers):
        gu = [pick() for _ in range(experts)]
        experts_plan[f"model.layers.{l}.mlp.experts"] = {"gate_up": gu, "down": [pick() for _ in range(experts)]}
    return {"quant_method": "mxmoe", "version": 1, "default_scheme": "bf16",
            "modules": {m: "int4_g128_asym" for m in _attn_modules(layers)}, "experts": experts_plan,
            "kv": None, "offload": offload_section(OFFLOAD_BUDGETS[variant]) if variant in OFFLOAD_BUDGETS else None,
            "meta": {"bench_variant": variant, "weights": "dummy"}}


GPTQ_W4 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
           "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                            ["self_attn.o_proj"], ["mlp.experts"]]}


def _dir_key(variant: str) -> str:
    """Model directory a variant runs on: bf16 / fp8 / bf16_cpuoff25 share the plain one, the GPTQ peers GPTQ's."""
    if variant in ("bf16", "fp8"):
        return "bf16"
    return VLLM_OFFLOAD[variant][0] if variant in VLLM_OFFLOAD else variant


def write_model_dirs(preset: str, layers: int, out: str, variants: list[str]) -> dict[str, str]:
    """Config-only model directories (config.json + tokenizer) per variant; returns {variant: dir}."""
    from mxserve.models.corpus import read_corpus
    from mxserve.models.tiny import PRESETS, build_config
    from mxserve.models.tokenizer import train_tokenizer
    arch, kwargs = PRESETS[preset]
    cfg = build_config(arch, dict(kwargs, num_hidden_layers=layers))
    base = os.path.join(out, "bf16")
    if not os.path.exists(os.path.join(base, "config.json")):
        os.makedirs(base, exist_ok=True)
        text, _ = read_corpus(max_bytes=1 << 20)
        train_tokenizer(text, min(8192, cfg.vocab_size), base)
        cfg.save_pretrained(base)
    dirs = {}
    for v in variants:
        key = _dir_key(v)
        d = base if key == "bf16" else os.path.join(out, key)
        if d != base and d not in dirs.values():
            os.makedirs(d, exist_ok=True)
            for fn in os.listdir(base):
                if fn != "config.json":
                    with open(os.path.join(base, fn), "rb") as src, open(os.path.join(d, fn), "wb") as dst:
                        dst.write(src.read())
            c = json.load(open(os.path.join(base, "config.json")))
            c["quantization_config"] = GPTQ_W4 if key == "gptq_w4" else mxmoe_plan(
                key, layers, c.get("num_experts") or c["num_local_experts"])
            with open(os.path.join(d, "config.json.tmp"), "w") as f:
                json.dump(c, f)
            os.replace(os.path.join(d, "config.json.tmp"), os.path.join(d, "config.json"))
        dirs[v] = d
    return dirs


# ---- runs --------------------------------------------------------------------------------------------------------
def _vllm(args: list[str], log: str) -> str:
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    text = open(log).read()
    if rc != 0:
        raise RuntimeError(f"vllm bench failed (rc={rc}); log {log}:\n" + "".join(text.splitlines(True)[-40:]))
    return text


def _common(variant: str, d: str) -> list[str]:
    q = {"fp8": ["--quantization", "fp8"], "gptq_w4": ["--quantization", "gptq_marlin"],
         "mxmoe_w4": ["--quantization", "mxmoe"], "mxmoe_mix25": ["--quantization", "mxmoe"]}.get(variant, [])
    return ["--model", d, "--load-format", "dummy", "--max-model-len", "4096", *q]


_QUANT = {"fp8": "fp8", "gptq_w4": "gptq_marlin", "mxmoe_w4": "mxmoe", "mxmoe_mix25": "mxmoe",
          "gptq_w4_cpuoff25": "gptq_marlin", **{v: "mxmoe" for v in OFFLOAD_BUDGETS}}


def engine_json(variant: str, user_json: str, geo: dict) -> str:
    """``--engine-json`` of a variant's runner: the user's object plus the vLLM offload peer's kwargs (which win)."""
    extra = json.loads(user_json or "{}")
    if not isinstance(extra, dict):
        raise ValueError(f"--engine-json: expected a JSON object, got {user_json!r}")
    return json.dumps({**extra, **vllm_offload_kwargs(geo, variant)})


def bench_variant_engine(variant: str, d: str, a, logs: str) -> dict:
    """One engine for the variant (``mxserve.vllm_plugin.bench_runner`` subprocess); weight GiB from its log."""
    lj, log = os.path.join(logs, f"{variant}-engine.json"), os.path.join(logs, f"{variant}-engine.log")
    timeout = a.variant_timeout
    with open(os.path.join(d, "config.json")) as f:
        geo = geometry(json.load(f))
    cmd = [sys.executable, "-m", "mxserve.vllm_plugin.bench_runner", "--model", d, "--batch-sizes", a.batch_sizes,
           "--input-len", str(a.input_len), "--output-len", str(a.output_len),
           "--engine-json", engine_json(variant, a.engine_json, geo),
           "--min-window-s", str(getattr(a, "min_window_s", 5.0)), "--min-repeats", str(getattr(a, "min_repeats", 3)),
           "--ttft-iters", str(getattr(a, "ttft_iters", 30)), "--budget-s", f"{max(timeout - 20.0, 1.0):.0f}",
           "--json", lj]
    if getattr(a, "ttft_input_len", None):
        cmd += ["--ttft-input-len", str(a.ttft_input_len)]
    if variant in OFFLOAD_BUDGETS:
        cmd += ["--offload-stats"]
    if variant in _QUANT:
        cmd += ["--quantization", _QUANT[variant]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # kill the whole group: the engine-core child holds the GPU
            rc = f"timeout after {timeout:.0f}s"
            _kill_group(proc)
        else:
            _kill_group(proc)  # a leftover engine core must not overlap the next variant
    text = open(log, errors="replace").read()
    if rc != 0:
        raise RuntimeError(f"bench_runner {variant} failed (rc={rc}); log {log}:\n" + _first_errors(text))
    r = json.load(open(lj))
    res = {"variant": variant, "throughput": {int(b): v for b, v in r["throughput"].items()},
           "ttft_ms": r["ttft_ms"], "ttft_p50_ms": r.get("ttft_p50_ms"), "ttft_p99_ms": r.get("ttft_p99_ms"),
           "startup_s": r.get("startup_s"), "timeout_s": round(timeout)}
    if r.get("windows"):
        res["windows"] = {int(b): {k: w[k] for k in ("repeats_tok_s", "window_s", "spread", "short")}
                          for b, w in r["windows"].items()}
    for k in ("ttft_input_len", "prefill_tok_s", "offload_ttft", "offload_final"):
        if r.get(k) is not None:
            res[k] = r[k]
    if r.get("offload"):
        res["offload"] = {int(b): x for b, x in r["offload"].items()}
    mem = _MEM_RE.search(text)
    if mem:
        res["weight_gib"] = float(mem.group(1))
    em = expert_memory(geo, variant)
    if em:
        res["expert_memory"] = em
    off = _OFFLOADED_RE.search(text)
    if off:
        res["cpu_offloaded_gib"] = float(off.group(1))   # what vLLM's UVA offloader actually moved (per parameter)
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            time.sleep(1.0 if sig == signal.SIGTERM else 0)
        except subprocess.TimeoutExpired:
            continue


def _first_errors(text: str, n: int = 30) -> str:
    """From the first ERROR / Traceback line, ``n`` lines, then the last 20 lines of the log."""
    lines = text.splitlines(True)
    i = next((k for k, l in enumerate(lines) if re.search(r"\bERROR\b|Traceback", l)), None)
    head = "".join(lines[i:i + n]) if i is not None else ""
    return head + "...\n" + "".join(lines[-20:])


def targets(results: list[dict], batch_sizes: list[int]) -> dict:
    """The issue's acceptance ratios: min over B <= 32 of variant / GPTQ-W4 tok/s, and mix weights / bf16."""
    by = {r["variant"]: r for r in results if "throughput" in r}
    out: dict = {}
    g = by.get("gptq_w4")
    for v, need in (("mxmoe_w4", 1.0), ("mxmoe_mix25", 1.25)):
        if g and v in by:
            rs = [by[v]["throughput"][b] / g["throughput"][b] for b in batch_sizes
                  if b <= 32 and by[v]["throughput"].get(b) and g["throughput"].get(b)]
            if rs:
                out[f"{v}_min_vs_gptq_w4"] = {"value": min(rs), "target": need, "ok": min(rs) >= need}
    mix, bf = by.get("mxmoe_mix25", {}).get("weight_gib"), by.get("bf16", {}).get("weight_gib")
    if mix and bf:
        out["mxmoe_mix25_weights_vs_bf16"] = {"value": mix / bf, "target": 0.3, "ok": mix / bf <= 0.3}
    # issue 7: 25% of the expert bytes on the GPU, batch-32 decode: >= 0.5x all-resident W4, >= 3x vLLM's offload
    def b32(v: str) -> float | None:
        return by.get(v, {}).get("throughput", {}).get(32)
    off = b32("mxmoe_w4_off25")
    for key, ref, need in (("mxmoe_w4_off25_vs_resident_b32", "mxmoe_w4", 0.5),
                           ("mxmoe_w4_off25_vs_vllm_cpuoff25_b32", "gptq_w4_cpuoff25", 3.0)):
        if off and b32(ref):
            out[key] = {"value": off / b32(ref), "target": need, "ok": off / b32(ref) >= need}
    return out


def bench_variant(variant: str, d: str, a, logs: str) -> dict:
    res: dict = {"variant": variant, "throughput": {}}
    extra = a.extra.split() if a.extra else []
    for b in [int(x) for x in a.batch_sizes.split(",")]:
        n = max(a.min_prompts, 2 * b)
        log = os.path.join(logs, f"{variant}-tput-b{b}.log")
        text = _vllm(["throughput", *_common(variant, d), "--dataset-name", "random", "--random-input-len",
                      str(a.input_len), "--random-output-len", str(a.output_len), "--num-prompts", str(n),
                      "--max-num-seqs", str(b), *extra], log)
        m = _TPUT_RE.search(text)
        res["throughput"][b] = float(m.group(3)) if m else None
        mem = _MEM_RE.search(text)
        if mem:
            res["weight_gib"] = float(mem.group(1))
    lj = os.path.join(logs, f"{variant}-ttft.json")
    _vllm(["latency", *_common(variant, d), "--batch-size", "1", "--input-len", str(a.input_len),
           "--output-len", "1", "--num-iters-warmup", "3", "--num-iters", "10", "--output-json", lj, *extra],
          os.path.join(logs, f"{variant}-ttft.log"))
    res["ttft_ms"] = 1000 * json.load(open(lj))["avg_latency"]
    return res


def markdown_rows(results: list[dict], batch_sizes: list[int], label: str) -> str:
    """Markdown table: output tok/s per batch size (median of repeats), the largest repeat spread, min ratio vs
    GPTQ-Marlin W4 at B<=32, TTFT p50 / p99, weight memory."""
    by = {r["variant"]: r for r in results}
    gptq, bf16 = by.get("gptq_w4"), by.get("bf16")
    gptq = gptq if gptq and "throughput" in gptq else None
    head = ("| run | variant | " + " | ".join(f"tok/s B={b}" for b in batch_sizes)
            + " | spread | min vs GPTQ-W4 (B<=32) | TTFT p50 / p99 ms | weights GiB | weights vs bf16 |\n|"
            + "---|" * (len(batch_sizes) + 7))
    rows = []
    for r in results:
        if "throughput" not in r:
            rows.append("| " + " | ".join([label, r["variant"], *("-" for _ in batch_sizes), "-", "failed", "-", "-",
                                           "-"]) + " |")
            continue
        t = r["throughput"]
        ratios = [t[b] / gptq["throughput"][b] for b in batch_sizes
                  if b <= 32 and gptq and t.get(b) and gptq["throughput"].get(b)]
        wm, wb = r.get("weight_gib"), (bf16 or {}).get("weight_gib")
        win = [w for b, w in (r.get("windows") or {}).items() if b in batch_sizes]
        short = " (short)" if any(w.get("short") for w in win) else ""
        spread = f"{100 * max(w['spread'] for w in win):.0f}%{short}" if win else "-"
        p50 = r.get("ttft_p50_ms") or r.get("ttft_ms")
        ttft = "-" if p50 is None else f"{p50:.1f}" + (f" / {r['ttft_p99_ms']:.1f}" if r.get("ttft_p99_ms") else "")
        cells = [label, r["variant"], *(f"{t[b]:,.0f}" if t.get(b) else "-" for b in batch_sizes), spread,
                 f"{min(ratios):.2f}x" if ratios else "-", ttft, f"{wm:.2f}" if wm else "-",
                 f"{wm / wb:.2f}x" if wm and wb else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows) + "\n"


def variant_timeout(a) -> float:
    """Per-variant timeout: ``--variant-timeout``, else derived from the work (``bench_runner.plan_budget_s``)."""
    if a.variant_timeout:
        return float(a.variant_timeout)
    return plan_budget_s(a.layers, [int(x) for x in a.batch_sizes.split(",")], a.input_len, a.output_len,
                         a.min_window_s, a.min_repeats, a.ttft_iters, ttft_input_len=getattr(a, "ttft_input_len", None))


def share_timeout(planned: float, left: float | None, need: float, after: int) -> float:
    """Timeout of the next variant: ``planned``, capped by what is ``left`` of the deadline minus the minimum
    (``need`` s) of each of the ``after`` variants still to come, when they can all get it; else all of ``left``."""
    if left is None:
        return planned
    rest = left - need * after
    return min(planned, rest if rest >= need else left)


def _summary(a, results: list[dict], batch_sizes: list[int], wall_s: float, pinned: dict | None = None) -> dict:
    return {"preset": a.preset, "layers": a.layers, "input_len": a.input_len, "output_len": a.output_len,
            "ttft_input_len": getattr(a, "ttft_input_len", None) or a.input_len,
            "batch_sizes": batch_sizes, "runner": a.runner, **(pinned or {}), "results": results,
            "targets": targets(results, batch_sizes), "wall_s": round(wall_s, 1)}


def _table(out: dict, label: str) -> str:
    md = markdown_rows(out["results"], out["batch_sizes"], label)
    md += offload_rows(out["results"], out["batch_sizes"], out.get("pinned_gbps"))
    return md + "".join(f"\n- {k}: {t['value']:.2f} (target {t['target']}) {'OK' if t['ok'] else 'MISSED'}"
                        for k, t in out["targets"].items()) + "\n"


def run(a) -> int:
    if getattr(a, "bench_command", None) != "e2e":
        raise ValueError("usage: mxserve bench e2e ... | mxserve bench merge ...")
    t0 = _clock()
    variants = [v for v in a.variants.split(",") if v]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        raise ValueError(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    offloading = [v for v in variants if v in OFFLOAD_BUDGETS or v in VLLM_OFFLOAD]
    if offloading and a.runner != "engine":
        raise ValueError(f"--variants {offloading}: the offload variants need --runner engine")
    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    dirs = write_model_dirs(a.preset, a.layers, a.out, variants)
    planned = variant_timeout(a)
    if a.dry_run:
        geos = {}
        for v in variants:
            with open(os.path.join(dirs[v], "config.json")) as f:
                geos[v] = geometry(json.load(f))
        print(json.dumps({"dirs": dirs, "variant_timeout_s": round(planned), "total_s": round(planned * len(variants)),
                          "startup_allowance_s": estimate_startup_s(a.layers),
                          "expert_memory": {v: expert_memory(geos[v], v) for v in variants},
                          "engine_json": {v: engine_json(v, a.engine_json, geos[v]) for v in variants}}, indent=1))
        return 0
    results = []
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    label = f"{a.preset} L={a.layers} in{a.input_len}/out{a.output_len}"
    fn = bench_variant_engine if a.runner == "engine" else bench_variant
    out: dict = {}
    # pinned copy bandwidth in the same run, before any engine holds the GPU (the offload rows' H2D reference)
    pinned = measure_pinned_gbps(a.pinned_gib) if offloading and getattr(a, "pinned_gib", 0) > 0 else None
    if pinned:
        print(f"[bench e2e] pinned H2D: {json.dumps(pinned)}", flush=True)
    for i, v in enumerate(variants):
        tv = _clock()
        left = None if a.deadline_s is None else a.deadline_s - (tv - t0) - 15.0  # 15 s: kill + JSON + table
        need = 0.5 * estimate_startup_s(a.layers) + 30.0  # below this, even a fast start-up cannot finish: skip
        if left is not None and left < need:
            res = {"variant": v, "error": f"skipped: {left:.0f} s left of --deadline-s, a variant needs >= {need:.0f}"}
            print(f"[bench e2e] {v} SKIPPED ({res['error']})", file=sys.stderr, flush=True)
        else:
            timeout = share_timeout(planned, left, need, len(variants) - i - 1)
            av = argparse.Namespace(**{**vars(a), "variant_timeout": timeout})
            try:
                res = fn(v, dirs[v], av, logs)
            except Exception as e:  # record and go on: one broken peer must not cost the whole comparison
                res = {"variant": v, "error": str(e)[-4000:]}
                print(f"[bench e2e] {v} FAILED: {str(e)[:2000]}", file=sys.stderr, flush=True)
        res["wall_s"] = round(_clock() - tv, 1)
        results.append(res)
        print(json.dumps({k: v_ for k, v_ in res.items() if k not in ("error", "windows", "offload", "offload_ttft",
                                                                          "offload_final")}), flush=True)
        out = _summary(a, results, batch_sizes, _clock() - t0, pinned)
        write_json_atomic(a.json, out)
    md = _table(out, label)
    print(md)
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write(md)
    return 0 if all("error" not in r for r in results) else 1


def _int_keys(res: dict) -> dict:
    """A result with its per-batch dicts keyed by int B again (JSON turned them into strings)."""
    return {**res, **{f: {int(b): x for b, x in res[f].items()} for f in ("throughput", "windows", "offload")
                      if res.get(f)}}


def merge_results(runs: list[dict]) -> dict:
    """One e2e summary from several calls' JSONs (same preset, layers, lengths): variants in first-seen order, a
    variant measured in several keeps the last successful result; batch sizes = the union; targets recomputed.

    Raises:
        ValueError: naming the field when the runs measured different geometries or lengths.
    """
    if not runs:
        raise ValueError("bench merge: no input JSON")
    for f in ("preset", "layers", "input_len", "output_len", "ttft_input_len"):
        vals = {r.get(f, r.get("input_len")) if f == "ttft_input_len" else r.get(f) for r in runs}
        if len(vals) > 1:
            raise ValueError(f"bench merge: inputs differ in {f!r}: {sorted(map(str, vals))}")
    by: dict[str, dict] = {}
    for r in runs:
        for res in r.get("results", []):
            if "throughput" in res or "throughput" not in by.get(res["variant"], {}):
                by[res["variant"]] = _int_keys(res)
    bs = sorted({int(b) for r in runs for b in r.get("batch_sizes", [])})
    results = list(by.values())
    pins = [r["pinned_gbps"] for r in runs if r.get("pinned_gbps")]
    pinned = {"pinned_gbps": statistics.median(pins), "pinned_gbps_runs": pins} if pins else {}
    return {**{f: runs[0].get(f) for f in ("preset", "layers", "input_len", "output_len", "runner")},
            "ttft_input_len": runs[0].get("ttft_input_len", runs[0].get("input_len")), **pinned,
            "batch_sizes": bs, "results": results, "targets": targets(results, bs),
            "wall_s": round(sum(r.get("wall_s", 0) for r in runs), 1), "merged_from": len(runs)}


def run_merge(a) -> int:
    runs = []
    for path in a.inputs:
        try:
            with open(path) as f:
                runs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"bench merge: cannot read {path}: {e}") from e
    out = merge_results(runs)
    write_json_atomic(a.json, out)
    md = _table(out, f"{out['preset']} L={out['layers']} in{out['input_len']}/out{out['output_len']} (merged)")
    print(md)
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write(md)
    return 0 if all("error" not in r for r in out["results"]) else 1
