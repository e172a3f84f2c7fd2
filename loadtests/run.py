"""Drive a scenario against an OpenAI-compatible endpoint.

    python -m loadtests.run --base-url http://127.0.0.1:8000 --scenario chat --duration 30 --json out.json \
        [--model NAME] [--max-requests N] [--png latency.png] [--md report.md] [--slo loadtests/slo.yaml]

Closed loop (``concurrent``: N users back to back) or open loop (``poisson``/``constant`` arrivals at ``rate``
req/s, optionally in bursts); a scenario with ``sweep_rates`` runs each rate for duration/len(rates) s and plots
latency vs offered load. Requests still in flight when the duration ends are awaited (bounded by --timeout).
Exit code 0 when the SLO passes (or --no-fail-on-slo), 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time

import httpx

from loadtests.client import RequestResult, build_body, stream_request
from loadtests.report import markdown, plot_latency_vs_load, summarize
from loadtests.scenario import Scenario, load_scenario, load_slo
from mxserve.io import write_json_atomic


async def discover_model(client: httpx.AsyncClient) -> str:
    """The first model id served at ``/v1/models``."""
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_level(client: httpx.AsyncClient, sc: Scenario, model: str, duration_s: float, rate: float | None,
                    max_requests: int | None, rng: random.Random) -> tuple[list[RequestResult], float]:
    """Run one load level; returns (results, wall seconds). ``rate`` None means closed loop at sc.concurrency."""
    results: list[RequestResult] = []
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    budget = [max_requests if max_requests is not None else 1 << 30]

    async def one() -> None:
        prompt, max_tokens = sc.sample(rng)
        path, body = build_body(sc.endpoint, model, prompt, max_tokens)
        r = await stream_request(client, path, body)
        r.offered_rate = rate
        results.append(r)

    if rate is None:
        async def user() -> None:
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                await one()
        await asyncio.gather(*(user() for _ in range(sc.concurrency)))
    else:
        tasks = []
        next_t = t0
        while next_t < deadline and budget[0] > 0:
            await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
            for _ in range(min(sc.burst_size, budget[0])):
                budget[0] -= 1
                tasks.append(asyncio.create_task(one()))
            gap = sc.burst_size / rate
            next_t += rng.expovariate(1.0 / gap) if sc.arrival == "poisson" else gap
        await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


async def run(base_url: str, sc: Scenario, duration_s: float, model: str | None = None,
              max_requests: int | None = None, timeout_s: float = 300.0, seed: int = 0,
              slo: dict | None = None, api_key: str | None = None) -> dict:
    """Run a scenario and return the JSON report (one summary, or ``levels`` for a sweep)."""
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers, limits=limits) as client:
        model = model or await discover_model(client)
        if sc.sweep_rates:
            levels, all_results, wall = [], [], 0.0
            share = duration_s / len(sc.sweep_rates)
            per_level = None if max_requests is None else max(1, max_requests // len(sc.sweep_rates))
            for rate in sc.sweep_rates:
                res, w = await run_level(client, sc, model, share, rate, per_level, rng)
                levels.append(dict(summarize(res, w, slo), offered_rate=rate))
                all_results += res
                wall += w
            out = summarize(all_results, wall, slo)
            out["levels"] = levels
        else:
            rate = None if sc.arrival == "concurrent" else sc.rate
            res, wall = await run_level(client, sc, model, duration_s, rate, max_requests, rng)
            out = dict(summarize(res, wall, slo), offered_rate=rate)
    out.update(scenario=sc.name, base_url=base_url, model=model)
    return out


def write_json(obj: dict, path: str) -> None:
    """Atomic JSON write (temp file then rename)."""
    write_json_atomic(path, obj)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    ap.add_argument("--scenario", required=True, help="name in loadtests/scenarios or a YAML path")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (whole sweep)")
    ap.add_argument("--max-requests", type=int, default=None)
    ap.add_argument("--model", default=None, help="default: first id from /v1/models")
    ap.add_argument("--slo", default=None, help="SLO YAML (default loadtests/slo.yaml)")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--png", default=None, help="latency vs offered load plot (sweep levels, or one point)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fail-on-slo", action="store_true")
    a = ap.parse_args(argv)
    sc, slo = load_scenario(a.scenario), load_slo(a.slo)
    out = asyncio.run(run(a.base_url, sc, a.duration, a.model, a.max_requests, a.timeout, a.seed, slo,
                          os.environ.get("OPENAI_API_KEY") or os.environ.get("VLLM_API_KEY")))
    if a.png:
        out["png"] = plot_latency_vs_load(out.get("levels") or [out], a.png)
    if a.json:
        write_json(out, a.json)
    md = markdown(out, f"{sc.name} @ {a.base_url}")
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print(md)
    return 0 if a.no_fail_on_slo or out["slo"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
