"""Summaries (TTFT/TPOT/ITL p50/p99, throughput, goodput, errors), SLO verdicts, markdown, and the latency vs
offered-load PNG."""
from __future__ import annotations

import math
from typing import Iterable

from loadtests.client import RequestResult


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for an empty list. q in [0, 100]."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _pcts(xs: list[float]) -> dict:
    return {"p50": percentile(xs, 50), "p99": percentile(xs, 99), "mean": sum(xs) / len(xs) if xs else None,
            "n": len(xs)}


def is_good(r: RequestResult, slo_request: dict) -> bool:
    """Succeeded and met every per-request bound (missing bounds are not checked)."""
    if not r.ok:
        return False
    checks = {"ttft_s": r.ttft, "tpot_s": r.tpot, "e2e_s": r.e2e}
    return all(v is None or checks.get(k) is None or checks[k] <= v for k, v in slo_request.items())


def summarize(results: Iterable[RequestResult], wall_s: float, slo: dict | None = None) -> dict:
    """Aggregate one run.

    Args:
        results: every request sent (fault injections flagged ``expected_failure`` are counted separately).
        wall_s: benchmark duration used for rates.
        slo: the ``slo.yaml`` dict; adds goodput and a pass/fail verdict.
    Returns:
        JSON-ready dict: counts, ``ttft_s``/``tpot_s``/``itl_s``/``e2e_s`` percentiles, throughputs, goodput.
    """
    results = list(results)
    real = [r for r in results if not r.expected_failure]
    ok = [r for r in real if r.ok]
    failed = [r for r in real if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        key = f"http_{r.status}" if r.status else (r.error.split(":")[0] or "unknown")
        errors[key] = errors.get(key, 0) + 1
    out = {
        "sent": len(real), "completed": len(ok), "failed": len(failed), "errors": errors,
        "faults_injected": len(results) - len(real),
        "duration_s": wall_s,
        "ttft_s": _pcts([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _pcts([r.tpot for r in ok if r.tpot is not None]),
        "itl_s": _pcts([x for r in ok for x in r.itls]),
        "e2e_s": _pcts([r.e2e for r in ok]),
        "request_throughput": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / wall_s if wall_s > 0 else 0.0,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in ok) / wall_s if wall_s > 0 else 0.0,
    }
    if slo:
        good = [r for r in ok if is_good(r, slo["request"])]
        out["goodput"] = len(good) / wall_s if wall_s > 0 else 0.0
        out["good_fraction"] = len(good) / len(real) if real else 0.0
        out["slo"] = check_slo(out, slo)
    return out


def check_slo(summary: dict, slo: dict) -> dict:
    """Per aggregate bound: {name: {"value", "limit", "ok"}} plus ``"pass"``."""
    agg = slo["aggregate"]
    vals = {"ttft_p99_s": summary["ttft_s"]["p99"], "itl_p99_s": summary["itl_s"]["p99"],
            "error_rate": summary["failed"] / summary["sent"] if summary["sent"] else 1.0,
            "min_goodput_fraction": summary.get("good_fraction")}
    res = {}
    for k, limit in agg.items():
        v = vals.get(k)
        ok = v is not None and (v >= limit if k.startswith("min_") else v <= limit)
        res[k] = {"value": v, "limit": limit, "ok": ok}
    res["pass"] = all(x["ok"] for x in res.values())
    return res


def markdown(summary: dict, title: str) -> str:
    """A short markdown table of one summary (or of each sweep level)."""
    rows = summary.get("levels") or [summary]
    lines = [f"### {title}", "", "| offered req/s | sent | ok | failed | TTFT p50/p99 s | TPOT p50/p99 s | "
             "ITL p50/p99 s | req/s | out tok/s | goodput req/s |", "|" + "---|" * 10]

    def f(x):
        return "-" if x is None else f"{x:.3g}"
    for s in rows:
        lines.append(f"| {f(s.get('offered_rate'))} | {s['sent']} | {s['completed']} | {s['failed']} | "
                     f"{f(s['ttft_s']['p50'])}/{f(s['ttft_s']['p99'])} | {f(s['tpot_s']['p50'])}/"
                     f"{f(s['tpot_s']['p99'])} | {f(s['itl_s']['p50'])}/{f(s['itl_s']['p99'])} | "
                     f"{f(s['request_throughput'])} | {f(s['output_throughput'])} | {f(s.get('goodput'))} |")
    if summary.get("errors"):
        lines += ["", f"errors: {summary['errors']}"]
    return "\n".join(lines) + "\n"


def plot_latency_vs_load(levels: list[dict], path: str) -> str:
    """PNG of TTFT/TPOT p50 and p99 against offered load (req/s; achieved throughput when not open loop)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv.get("offered_rate") or lv["request_throughput"] for lv in levels]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, metric in enumerate(("ttft_s", "tpot_s")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax[i].plot(xs, [lv[metric][q] if lv[metric][q] is not None else float("nan") for lv in levels], style,
                       label=q)
        ax[i].set_xlabel("offered load (req/s)")
        ax[i].set_ylabel(f"{metric[:-2].upper()} (s)")
        ax[i].grid(True, alpha=0.3)
        ax[i].legend()
    fig.suptitle("latency vs offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
