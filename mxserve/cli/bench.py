"""``mxserve bench e2e``: vLLM end-to-end throughput / latency of mxmoe vs its peers, measured in the same run.

Variants (random weights via ``--load-format dummy`` on config-only model directories, same geometry):
  bf16; fp8 (``--quantization fp8``, online); gptq_w4 (GPTQ-Marlin W4 g128 sym on attention + experts);
  mxmoe_w4 (int4 g128 asym on attention + experts); mxmoe_mix25 (experts 75% int2 / 25% int3 g128 asym = 2.5 bits
  with metadata, attention int4).
Runner ``engine`` (default): ONE vLLM engine per variant (``python -m mxserve.vllm_plugin.bench_runner`` in a
subprocess, default torch.compile + CUDA graphs): output tok/s at each batch size B (B prompts of ``--input-len``
random tokens, ``--output-len`` output tokens, all in flight at once) and TTFT (one prompt, one output token, mean
of 10). Runner ``vllm-bench``: ``vllm bench throughput --max-num-seqs B`` per B plus ``vllm bench latency`` (one
engine start per call: several minutes per variant). Weight memory is parsed from vLLM's "Model loading took X GiB"
log line. A failing variant is recorded with its error and the others still run; the JSON is rewritten after each
variant (atomic) and ends with the issue's targets (mxmoe W4 >= 1.0x GPTQ-W4 and the 2.5-bit mix >= 1.25x GPTQ-W4
at B <= 32; mix weights <= 0.3x bf16). ``--markdown`` gets the table appended.

Examples (H200)::

    # the issue's quick comparison, 4-layer A3B geometry (~5-7 min)
    mxserve bench e2e --preset qwen3-30b-a3b --layers 4 --batch-sizes 1,8,32 --out /tmp/e2e \
        --json $OUT/e2e.json --markdown $OUT/e2e.md
    # full geometry
    mxserve bench e2e --preset qwen3-30b-a3b --layers 48 --out /tmp/e2e --json $OUT/e2e.json --markdown $OUT/e2e.md
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

from mxserve.io import write_json_atomic

VARIANTS = ("bf16", "fp8", "gptq_w4", "mxmoe_w4", "mxmoe_mix25")
_TPUT_RE = re.compile(r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s")
_MEM_RE = re.compile(r"Model loading took ([\d.]+) GiB")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks against vLLM peers measured in the same run")
    sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    e = sub.add_parser("e2e", help="vllm bench throughput/latency: bf16, fp8, GPTQ-Marlin W4, mxmoe W4, mxmoe 2.5b")
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
    e.add_argument("--variant-timeout", type=float, default=240.0, help="seconds per variant (engine runner)")
    e.add_argument("--dry-run", action="store_true", help="write the model directories and print the commands")
    e.set_defaults(func=run)
    p.set_defaults(func=lambda a: p.print_help() or 2)


# ---- model directories -----------------------------------------------------------------------------------------
def _attn_modules(layers: int, projs=("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    return [f"model.layers.{l}.self_attn.{p}" for l in range(layers) for p in projs]


def mxmoe_plan(variant: str, layers: int, experts: int, seed: int = 0) -> dict:
    """The quantization_config of an mxmoe benchmark variant (HF names, Qwen3-MoE layout)."""
    rng = random.Random(seed)
    if variant == "mxmoe_w4":
        pick = lambda: "int4_g128_asym"  # noqa: E731
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
            "kv": None, "offload": None, "meta": {"bench_variant": variant, "weights": "dummy"}}


GPTQ_W4 = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
           "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                            ["self_attn.o_proj"], ["mlp.experts"]]}


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
        d = base if v in ("bf16", "fp8") else os.path.join(out, v)
        if d != base:
            os.makedirs(d, exist_ok=True)
            for fn in os.listdir(base):
                if fn != "config.json":
                    with open(os.path.join(base, fn), "rb") as src, open(os.path.join(d, fn), "wb") as dst:
                        dst.write(src.read())
            c = json.load(open(os.path.join(base, "config.json")))
            c["quantization_config"] = GPTQ_W4 if v == "gptq_w4" else mxmoe_plan(v, layers, c.get("num_experts") or c["num_local_experts"])
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


_QUANT = {"fp8": "fp8", "gptq_w4": "gptq_marlin", "mxmoe_w4": "mxmoe", "mxmoe_mix25": "mxmoe"}


def bench_variant_engine(variant: str, d: str, a, logs: str) -> dict:
    """One engine for the variant (``mxserve.vllm_plugin.bench_runner`` subprocess); weight GiB from its log."""
    lj, log = os.path.join(logs, f"{variant}-engine.json"), os.path.join(logs, f"{variant}-engine.log")
    cmd = [sys.executable, "-m", "mxserve.vllm_plugin.bench_runner", "--model", d, "--batch-sizes", a.batch_sizes,
           "--input-len", str(a.input_len), "--output-len", str(a.output_len), "--engine-json", a.engine_json,
           "--json", lj]
    if variant in _QUANT:
        cmd += ["--quantization", _QUANT[variant]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=a.variant_timeout)
        except subprocess.TimeoutExpired:  # kill the whole group: the engine-core child holds the GPU
            rc = f"timeout after {a.variant_timeout:.0f}s"
            _kill_group(proc)
        else:
            _kill_group(proc)  # a leftover engine core must not overlap the next variant
    text = open(log, errors="replace").read()
    if rc != 0:
        raise RuntimeError(f"bench_runner {variant} failed (rc={rc}); log {log}:\n" + _first_errors(text))
    r = json.load(open(lj))
    res = {"variant": variant, "throughput": {int(b): v for b, v in r["throughput"].items()},
           "ttft_ms": r["ttft_ms"], "ttft_p50_ms": r.get("ttft_p50_ms"), "startup_s": r.get("startup_s")}
    mem = _MEM_RE.search(text)
    if mem:
        res["weight_gib"] = float(mem.group(1))
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
    """Markdown table: output tok/s per batch size, min ratio vs GPTQ-Marlin W4 at B<=32, TTFT, weight memory."""
    by = {r["variant"]: r for r in results}
    gptq, bf16 = by.get("gptq_w4"), by.get("bf16")
    gptq = gptq if gptq and "throughput" in gptq else None
    head = ("| run | variant | " + " | ".join(f"tok/s B={b}" for b in batch_sizes)
            + " | min vs GPTQ-W4 (B<=32) | TTFT ms | weights GiB | weights vs bf16 |\n|" + "---|" * (len(batch_sizes) + 6))
    rows = []
    for r in results:
        if "throughput" not in r:
            rows.append("| " + " | ".join([label, r["variant"], *("-" for _ in batch_sizes), "failed", "-", "-", "-"])
                        + " |")
            continue
        t = r["throughput"]
        ratios = [t[b] / gptq["throughput"][b] for b in batch_sizes
                  if b <= 32 and gptq and t.get(b) and gptq["throughput"].get(b)]
        wm, wb = r.get("weight_gib"), (bf16 or {}).get("weight_gib")
        cells = [label, r["variant"], *(f"{t[b]:,.0f}" if t.get(b) else "-" for b in batch_sizes),
                 f"{min(ratios):.2f}x" if ratios else "-", f"{r['ttft_ms']:.1f}" if "ttft_ms" in r else "-",
                 f"{wm:.2f}" if wm else "-", f"{wm / wb:.2f}x" if wm and wb else "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows) + "\n"


def run(a) -> int:
    if getattr(a, "bench_command", None) != "e2e":
        raise ValueError("usage: mxserve bench e2e ...")
    variants = [v for v in a.variants.split(",") if v]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        raise ValueError(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    dirs = write_model_dirs(a.preset, a.layers, a.out, variants)
    if a.dry_run:
        print(json.dumps(dirs, indent=1))
        return 0
    t0, results = time.time(), []
    batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    label = f"{a.preset} L={a.layers} in{a.input_len}/out{a.output_len}"
    fn = bench_variant_engine if a.runner == "engine" else bench_variant
    out: dict = {}
    for v in variants:
        tv = time.time()
        try:
            res = fn(v, dirs[v], a, logs)
        except Exception as e:  # record and go on: one broken peer must not cost the whole comparison
            res = {"variant": v, "error": str(e)[-4000:]}
            print(f"[bench e2e] {v} FAILED: {str(e)[:2000]}", file=sys.stderr, flush=True)
        res["wall_s"] = round(time.time() - tv, 1)
        results.append(res)
        print(json.dumps({k: v_ for k, v_ in res.items() if k != "error"}), flush=True)
        out = {"preset": a.preset, "layers": a.layers, "input_len": a.input_len, "output_len": a.output_len,
               "batch_sizes": batch_sizes, "runner": a.runner, "results": results,
               "targets": targets(results, batch_sizes), "wall_s": round(time.time() - t0, 1)}
        write_json_atomic(a.json, out)
    md = markdown_rows(results, batch_sizes, label)
    md += "".join(f"\n- {k}: {t['value']:.2f} (target {t['target']}) {'OK' if t['ok'] else 'MISSED'}"
                  for k, t in out["targets"].items()) + "\n"
    print(md)
    if a.markdown:
        with open(a.markdown, "a") as f:
            f.write(md)
    return 0 if all("error" not in r for r in results) else 1
