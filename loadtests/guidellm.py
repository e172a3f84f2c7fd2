"""GuideLLM command lines for the ``loadtests/scenarios`` and a converter of GuideLLM's JSON into our report format.

    python -m loadtests.guidellm --scenario chat --base-url http://127.0.0.1:8000 [--duration 60]
        [--model ID] [--processor TOKENIZER_DIR] [--output-path gl.json] [--run [--json report.json]]
    python -m loadtests.guidellm --to-report gl.json --json report.json [--md report.md] [--png latency.png]

Targets GuideLLM >= 0.8 (``guidellm run --backend/--profile/--data/--constraint/--output``, every option a
``kind=...,key=value`` string; older releases had ``guidellm benchmark --target --rate-type``). Mapping:

    scenario arrival          GuideLLM profile
    concurrent, N users   ->  kind=concurrent,streams=N
    poisson / constant    ->  kind=poisson|constant,rate=R   (``burst_size`` > 1 has no GuideLLM equivalent: the
                                                              same mean rate without bursts; a note says so)
    sweep_rates [r1..rn]  ->  kind=poisson,rate=[r1..rn]     (max_duration = duration / n per rate, as ours)

Prompt/output lengths become ``synthetic_text`` ``prompt_tokens``/``output_tokens`` (+ ``_stdev``); our scenarios
give prompt length in words, converted with ``--tokens-per-word`` (1.0: the sampler's words are common English
words, one BPE token each in the Qwen/Llama tokenizers). GuideLLM generates prompts with a tokenizer: by default
the served model id (a local checkpoint path under ``vllm serve CKPT``); ``--processor`` names another (a local
directory when there is no network). GuideLLM is not a dependency of mxserve: ``pip install guidellm`` to ``--run``.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys

from loadtests.report import markdown, plot_latency_vs_load
from loadtests.scenario import Scenario, load_scenario, load_slo
from mxserve.io import write_json_atomic

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _num(x: float) -> str:
    """Shortest exact text of a number (ints without '.0')."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _kv(**kw) -> str:
    """GuideLLM's ``key=value,...`` option syntax; lists use its bracket-index form (``rate[0]=1,rate[1]=2``)."""
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            parts += [f"{k}[{i}]={_num(x) if isinstance(x, (int, float)) else x}" for i, x in enumerate(v)]
        else:
            text = _num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
            if "," in text or "=" in text:
                raise ValueError(f"GuideLLM option value for {k!r} may not contain ',' or '=': {text!r}")
            parts.append(f"{k}={text}")
    return ",".join(parts)


def _tokens(mean_std: tuple[float, float], scale: float) -> dict:
    mean, std = max(1, round(mean_std[0] * scale)), round(mean_std[1] * scale)
    return {"mean": mean, "stdev": std if std > 0 else None}


def profile_for(sc: Scenario) -> tuple[dict, list[str]]:
    """GuideLLM profile fields for a scenario, and notes on what could not be mapped exactly.

    Returns:
        ({"kind": ..., "streams"|"rate": ...}, notes)
    """
    notes = []
    if sc.sweep_rates:
        return {"kind": "poisson", "rate": list(sc.sweep_rates)}, notes
    if sc.arrival == "concurrent":
        return {"kind": "concurrent", "streams": sc.concurrency}, notes
    if sc.burst_size > 1:
        notes.append(f"scenario {sc.name}: burst_size={sc.burst_size} has no GuideLLM equivalent; "
                     f"{sc.arrival} arrivals at the same mean rate {sc.rate:g} req/s without bursts")
    return {"kind": sc.arrival, "rate": sc.rate}, notes


def guidellm_args(sc: Scenario, base_url: str, duration_s: float, *, model: str | None = None,
                  processor: str | None = None, output_path: str = "guidellm.json", max_requests: int | None = None,
                  tokens_per_word: float = 1.0, timeout_s: float = 300.0, seed: int = 0,
                  interactive: bool = False) -> tuple[list[str], list[str]]:
    """The ``guidellm`` argv (without the program name) that runs ``sc`` against ``base_url``.

    Args:
        sc: the scenario. base_url: server root (``http://host:port``, no ``/v1``).
        duration_s: seconds of load; a sweep gives each of its P rates duration_s / P (per-strategy max_duration).
        model: model id (default: GuideLLM asks ``/v1/models``). processor: tokenizer for synthetic prompts.
        output_path: GuideLLM's JSON report. max_requests: per-strategy request cap.
        tokens_per_word: prompt words -> prompt tokens. timeout_s: per-request read timeout.
        interactive: keep GuideLLM's live progress display (off for logs/CI).
    Returns:
        (argv, notes): argv for ``guidellm``; notes on approximations (e.g. bursts).
    """
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0 s, got {duration_s}")
    prof, notes = profile_for(sc)
    per_strategy = duration_s / len(sc.sweep_rates) if sc.sweep_rates else duration_s
    p, o = _tokens(sc.prompt_words, tokens_per_word), _tokens(sc.max_tokens, 1.0)
    argv = ["run",
            "--backend", _kv(kind="openai_http", target=base_url.rstrip("/"), model=model,
                             request_format=ENDPOINTS[sc.endpoint], timeout=timeout_s),
            "--profile", _kv(**prof),
            "--data", _kv(kind="synthetic_text", prompt_tokens=p["mean"], prompt_tokens_stdev=p["stdev"],
                          prompt_tokens_min=1 if p["stdev"] else None, output_tokens=o["mean"],
                          output_tokens_stdev=o["stdev"], output_tokens_min=1 if o["stdev"] else None),
            "--constraint", _kv(kind="max_duration", seconds=per_strategy)]
    if max_requests is not None:
        argv += ["--constraint", _kv(kind="max_requests", count=max_requests)]
    if processor:
        argv += ["--tokenizer", _kv(kind="huggingface_auto", model=processor)]
    argv += ["--seed", _kv(kind="static", value=seed), "--output", _kv(kind="json", path=output_path)]
    if not interactive:
        argv.append("--disable-console-interactive")
    return argv, notes


def guidellm_available() -> bool:
    """True when the ``guidellm`` package is importable in this interpreter."""
    return importlib.util.find_spec("guidellm") is not None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.guidellm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", help="name in loadtests/scenarios or a YAML path")
    ap.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (a sweep: all rates together)")
    ap.add_argument("--max-requests", type=int, default=None, help="request cap per rate/strategy")
    ap.add_argument("--model", default=None, help="model id (default: GuideLLM asks /v1/models)")
    ap.add_argument("--processor", default=None, help="tokenizer for synthetic prompts (HF id or local dir)")
    ap.add_argument("--tokens-per-word", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request read timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-path", default="guidellm.json", help="GuideLLM's own JSON report")
    ap.add_argument("--run", action="store_true", help="run it (needs guidellm installed) instead of printing")
    ap.add_argument("--to-report", metavar="GUIDELLM_JSON", help="convert a GuideLLM JSON report and exit")
    ap.add_argument("--slo", default=None, help="SLO YAML for goodput (default loadtests/slo.yaml)")
    ap.add_argument("--json", default=None, help="our report (with --run or --to-report)")
    ap.add_argument("--md", default=None, help="markdown table (with --run or --to-report)")
    ap.add_argument("--png", default=None, help="latency vs offered load (with --run or --to-report)")
    a = ap.parse_args(argv)
    if a.to_report:
        return _write_report(a.to_report, a)
    if not a.scenario or not a.base_url:
        ap.error("--scenario and --base-url are required (or --to-report FILE)")
    sc = load_scenario(a.scenario)
    args, notes = guidellm_args(sc, a.base_url, a.duration, model=a.model, processor=a.processor,
                                output_path=a.output_path, max_requests=a.max_requests,
                                tokens_per_word=a.tokens_per_word, timeout_s=a.timeout, seed=a.seed)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if not a.run:
        print(shlex.join(["guidellm"] + args))
        return 0
    if not guidellm_available():
        print("guidellm is not installed here (pip install guidellm); the command is:\n  "
              + shlex.join(["guidellm"] + args), file=sys.stderr)
        return 2
    rc = subprocess.call([sys.executable, "-m", "guidellm"] + args)
    if rc != 0:
        return rc
    return _write_report(a.output_path, a, scenario=sc.name)


def _write_report(path: str, a: argparse.Namespace, scenario: str | None = None) -> int:
    from loadtests.guidellm_report import to_report
    try:
        out = to_report(path, load_slo(a.slo))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if scenario:
        out["scenario"] = scenario
    if a.png:
        out["png"] = plot_latency_vs_load(out.get("levels") or [out], a.png)
    if a.json:
        write_json_atomic(a.json, out)
    md = markdown(out, f"GuideLLM {out.get('scenario') or ''} @ {out.get('base_url')}")
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print(md)
    return 0 if out["slo"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
