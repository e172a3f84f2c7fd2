"""Bounded soak + fault driver (loopback only).

    python -m loadtests.soak --base-url http://127.0.0.1:8000 --duration 1800 --max-requests 200000 \
        --concurrency 8 --fault-every 5 --json soak.json

Keeps ``--concurrency`` chat users busy and, every ``--fault-every`` seconds, injects one fault in turn:
mid-stream client disconnect, oversize prompt (must get a 4xx), invalid parameters (must get 400), and a burst
of ``--burst`` extra requests above capacity (these must still complete). Samples the server's RSS from
``/metrics`` (``process_resident_memory_bytes``) to show memory stays flat. Bounded in time and request count;
refuses any non-loopback URL. Passes (exit 0) when no real request was lost, every fault got the expected answer,
``/health`` is still 200 at the end, and RSS grew less than ``--max-rss-growth``.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import sys
import time
from urllib.parse import urlparse

import httpx

from loadtests.client import RequestResult, build_body, stream_request
from loadtests.report import summarize
from loadtests.run import discover_model, write_json
from loadtests.scenario import load_scenario, load_slo

MAX_DURATION_S = 4 * 3600
MAX_REQUESTS = 1_000_000
FAULTS = ("disconnect", "oversize", "invalid", "burst")


def assert_loopback(base_url: str) -> None:
    """Raise ValueError unless ``base_url`` points at this machine (127.0.0.0/8, ::1, localhost)."""
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"soak/fault driver only targets loopback servers, got host {host!r} in {base_url!r}")


async def rss_bytes(client: httpx.AsyncClient) -> float | None:
    """Sum of ``process_resident_memory_bytes`` samples on /metrics (None when absent)."""
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return None
    vals = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("process_resident_memory_bytes")]
    return sum(vals) if vals else None


async def soak(base_url: str, duration_s: float, max_requests: int, concurrency: int = 4, fault_every_s: float = 5.0,
               burst: int = 16, oversize_words: int = 200_000, seed: int = 0, timeout_s: float = 120.0) -> dict:
    """Run the soak; returns the JSON report (see module docstring)."""
    assert_loopback(base_url)
    if not 0 < duration_s <= MAX_DURATION_S or not 0 < max_requests <= MAX_REQUESTS:
        raise ValueError(f"duration must be in (0, {MAX_DURATION_S}] s and max_requests in (0, {MAX_REQUESTS}]")
    rng = random.Random(seed)
    sc = load_scenario("chat")
    results: list[RequestResult] = []
    fault_log: list[dict] = []
    rss: list[tuple[float, float]] = []
    budget = [max_requests]
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s,
                                 limits=httpx.Limits(max_connections=concurrency + burst + 16)) as client:
        model = await discover_model(client)

        async def one(**kw) -> RequestResult:
            prompt, max_tokens = sc.sample(rng)
            path, body = build_body("chat", model, prompt, max_tokens)
            r = await stream_request(client, path, body, **kw)
            results.append(r)
            return r

        async def user():
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                await one()

        async def faults():
            i = 0
            while time.perf_counter() + fault_every_s < deadline and budget[0] > 0:
                await asyncio.sleep(fault_every_s)
                kind = FAULTS[i % len(FAULTS)]
                i += 1
                budget[0] -= 1
                if kind == "disconnect":
                    r = await one(disconnect_after_chunks=1)
                    r.expected_failure = True
                    fault_log.append({"fault": kind, "ok": bool(r.chunk_times) or r.ok, "status": r.status})
                elif kind in ("oversize", "invalid"):
                    extra = {"temperature": -3.0, "max_tokens": -5} if kind == "invalid" else {}
                    prompt = " ".join(["word"] * oversize_words) if kind == "oversize" else "hi"
                    path, body = build_body("chat", model, prompt, 16)
                    body.update(extra)
                    r = await stream_request(client, path, body)
                    r.expected_failure = True
                    results.append(r)
                    fault_log.append({"fault": kind, "ok": 400 <= r.status < 500, "status": r.status})
                else:
                    n = min(burst, budget[0])
                    budget[0] -= n
                    rs = await asyncio.gather(*(one() for _ in range(n)))
                    fault_log.append({"fault": kind, "ok": all(x.ok for x in rs), "n": n})

        async def sampler():
            while time.perf_counter() < deadline:
                v = await rss_bytes(client)
                if v is not None:
                    rss.append((time.perf_counter() - t0, v))
                await asyncio.sleep(min(10.0, max(1.0, duration_s / 20)))

        await asyncio.gather(sampler(), faults(), *(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        healthy = (await client.get("/health")).status_code == 200
        final_rss = await rss_bytes(client)
        if final_rss is not None:
            rss.append((time.perf_counter() - t0, final_rss))
    out = summarize(results, wall, load_slo())
    lost = out["failed"]
    # memory: compare the first and last quarter of samples (warm-up allocations land in the first)
    growth = None
    if len(rss) >= 4:
        q = max(1, len(rss) // 4)
        first, last = sum(v for _, v in rss[:q]) / q, sum(v for _, v in rss[-q:]) / q
        growth = (last - first) / first
    out.update(lost_requests=lost, faults=fault_log, faults_ok=all(f["ok"] for f in fault_log),
               healthy_after=healthy, rss_samples=rss, rss_growth_fraction=growth, base_url=base_url, model=model)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--fault-every", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--oversize-words", type=int, default=200_000)
    ap.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed RSS growth fraction")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s); bounds the final drain")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    out = asyncio.run(soak(a.base_url, a.duration, a.max_requests, a.concurrency, a.fault_every, a.burst,
                           a.oversize_words, timeout_s=a.timeout))
    mem_ok = out["rss_growth_fraction"] is None or out["rss_growth_fraction"] <= a.max_rss_growth
    out["pass"] = out["lost_requests"] == 0 and out["faults_ok"] and out["healthy_after"] and mem_ok
    if a.json:
        write_json(out, a.json)
    print({k: out[k] for k in ("sent", "completed", "lost_requests", "faults_ok", "healthy_after",
                               "rss_growth_fraction", "pass")})
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
