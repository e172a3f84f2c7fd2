"""Verdict of a soak run (``.ci/gpu/soak.sh``): client reports, server counters and process-tree memory together.

    python -m loadtests.soak_check --soak soak.json --sweep sweep.json --metrics-before before.txt \
        --metrics-after after.txt --rss rss.jsonl --json soak_summary.json [--max-rss-growth 0.10]

Passes (exit 0) when: the soak driver passed (0 lost requests, every fault answered as expected, ``/health`` 200
after, API-server RSS flat); the sweep lost no request; the server's finished-request counters agree with the
clients (``vllm:request_success_total`` or ``mxserve:requests_total`` by ``finished_reason``: stop + length >= the
requests the clients completed, and at most that plus the injected disconnects; no ``error``); and the RSS of the
server's whole process tree grew less than ``--max-rss-growth`` between the first and last quarter of the soak.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from prometheus_client.parser import text_string_to_metric_families

from loadtests.procmem import growth
from mxserve.io import write_json_atomic

FINISHED = ("vllm:request_success_total", "mxserve:requests_total")


def finished_by_reason(text: str) -> dict[str, float]:
    """{finished_reason (lower case): count} summed over engines/models, from the first FINISHED series present."""
    for name in FINISHED:
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name:
                    r = str(s.labels.get("finished_reason", "")).lower().rsplit(".", 1)[-1]
                    out[r] = out.get(r, 0.0) + float(s.value)
        if out:
            return out
    return {}


def _load_json(path: str, what: str) -> dict:
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {p} does not exist (that step did not finish)")
    return json.loads(p.read_text())


def check(soak: dict, sweep: dict | None, before: str, after: str, rss_lines: list[dict],
          max_rss_growth: float = 0.10) -> dict:
    """All checks; returns {"checks": {name: {"ok", ...}}, "pass": bool, ...} (see module docstring).

    Args:
        soak: ``loadtests.soak`` JSON. sweep: ``loadtests.run`` JSON of the sweep (None if not run).
        before / after: ``/metrics`` text scraped before the soak and after the sweep.
        rss_lines: ``loadtests.procmem`` samples taken during the soak (and sweep).
    """
    checks: dict[str, dict] = {}
    checks["soak_driver"] = {"ok": bool(soak.get("pass")), "lost_requests": soak.get("lost_requests"),
                             "faults_ok": soak.get("faults_ok"), "healthy_after": soak.get("healthy_after"),
                             "api_rss_growth": soak.get("rss_growth_fraction")}
    if sweep is not None:
        checks["sweep_no_loss"] = {"ok": sweep.get("failed") == 0 and sweep.get("sent", 0) > 0,
                                   "sent": sweep.get("sent"), "failed": sweep.get("failed"),
                                   "errors": sweep.get("errors")}
    b, a = finished_by_reason(before), finished_by_reason(after)
    delta = {r: a.get(r, 0.0) - b.get(r, 0.0) for r in set(a) | set(b)}
    client_ok = int(soak.get("completed", 0)) + int((sweep or {}).get("completed", 0))
    disconnects = sum(1 for f in soak.get("faults", []) if f.get("fault") == "disconnect")
    done = delta.get("stop", 0.0) + delta.get("length", 0.0)
    checks["server_counters"] = {
        "ok": bool(a) and client_ok <= done <= client_ok + disconnects and delta.get("error", 0.0) == 0,
        "finished_delta": delta, "client_completed": client_ok, "disconnect_faults": disconnects,
        "found": bool(a)}
    rss = [float(x["rss_bytes"]) for x in rss_lines if x.get("rss_bytes")]
    g = growth(rss)
    gpu = [float(x["gpu_used_bytes"]) for x in rss_lines if x.get("gpu_used_bytes")]
    checks["tree_rss_flat"] = {"ok": g is not None and g <= max_rss_growth, "growth": g, "limit": max_rss_growth,
                               "samples": len(rss), "first_bytes": rss[0] if rss else None,
                               "last_bytes": rss[-1] if rss else None, "gpu_used_growth": growth(gpu)}
    return {"checks": checks, "pass": all(c["ok"] for c in checks.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.soak_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--soak", required=True)
    ap.add_argument("--sweep", default=None)
    ap.add_argument("--metrics-before", required=True)
    ap.add_argument("--metrics-after", required=True)
    ap.add_argument("--rss", required=True, help="loadtests.procmem JSON lines")
    ap.add_argument("--max-rss-growth", type=float, default=0.10)
    ap.add_argument("--planned-soak", type=float, default=None, help="planned soak seconds (flags a shortened soak)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    try:
        soak = _load_json(a.soak, "soak report")
        sweep = _load_json(a.sweep, "sweep report") if a.sweep else None
        rss_path = pathlib.Path(a.rss)
        rss = [json.loads(x) for x in rss_path.read_text().splitlines() if x.strip()] if rss_path.is_file() else []
        out = check(soak, sweep, pathlib.Path(a.metrics_before).read_text(),
                    pathlib.Path(a.metrics_after).read_text(), rss, a.max_rss_growth)
        if a.planned_soak:
            out["soak_planned_s"], out["soak_actual_s"] = a.planned_soak, soak.get("duration_s")
            out["soak_shortened"] = (soak.get("duration_s") or 0) < a.planned_soak - 15
    except (OSError, ValueError) as e:
        out = {"checks": {"inputs": {"ok": False, "error": str(e)}}, "pass": False}
    write_json_atomic(a.json, out)
    for name, c in out["checks"].items():
        print(f"{'PASS' if c['ok'] else 'FAIL'} {name}: " + json.dumps({k: v for k, v in c.items() if k != 'ok'}))
    if out.get("soak_shortened"):
        print(f"WARNING: the soak ran {out['soak_actual_s']:.0f} s of the planned {out['soak_planned_s']:.0f} s "
              "(slow server start-up)")
    print("soak verdict:", "PASS" if out["pass"] else "FAIL")
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
