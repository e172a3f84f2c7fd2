"""GuideLLM scenarios (``loadtests.guidellm``) and the GuideLLM JSON -> report converter (``loadtests.guidellm_report``).

Without guidellm installed: every scenario maps (decoded back from the generated option strings) and the converter
reproduces numpy percentiles / counts / goodput on a GuideLLM-v2-shaped report with known per-request values.
With guidellm installed: the generated command parses and validates with GuideLLM's own click CLI and pydantic
schemas, and (slow) a real GuideLLM run against a loopback mock server converts consistently with GuideLLM's own
aggregates.
"""
import asyncio
import json
import random
import shlex
import subprocess
import sys

import numpy as np
import pytest

from loadtests import guidellm as gl
from loadtests.guidellm_report import to_report
from loadtests.report import check_slo
from loadtests.scenario import HERE, load_scenario, load_slo
from tests.helpers.mock_openai import base_app, serve_in_thread

SCENARIOS = sorted(p.stem for p in (HERE / "scenarios").glob("*.yaml"))


def _decode(opt: str) -> dict:
    """Inverse of gl._kv for the values it writes (scalars, ``k[i]=v`` lists)."""
    out: dict = {}
    for part in opt.split(","):
        k, v = part.split("=", 1)
        try:
            val = float(v) if "." in v or "e" in v else int(v)
        except ValueError:
            val = v
        if "[" in k:
            name, idx = k[:-1].split("[")
            lst = out.setdefault(name, [])
            assert int(idx) == len(lst)
            lst.append(val)
        else:
            out[k] = val
    return out


def _options(argv: list[str]) -> dict[str, list[dict]]:
    assert argv[0] == "run"
    opts: dict[str, list[dict]] = {}
    it = iter(argv[1:])
    for a in it:
        if a.startswith("--disable"):
            continue
        opts.setdefault(a, []).append(_decode(next(it)))
    return opts


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_maps(name):
    sc = load_scenario(name)
    argv, notes = gl.guidellm_args(sc, "http://127.0.0.1:8000/", 120.0, max_requests=50, tokens_per_word=1.5,
                                   processor="/models/tok")
    o = _options(argv)
    be = o["--backend"][0]
    assert be["target"] == "http://127.0.0.1:8000" and be["kind"] == "openai_http"
    assert be["request_format"] == {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[sc.endpoint]
    prof = o["--profile"][0]
    if sc.sweep_rates:
        assert prof["kind"] == "poisson" and prof["rate"] == list(sc.sweep_rates)
        per = 120.0 / len(sc.sweep_rates)
    elif sc.arrival == "concurrent":
        assert prof == {"kind": "concurrent", "streams": sc.concurrency}
        per = 120.0
    else:
        assert prof == {"kind": sc.arrival, "rate": sc.rate}
        per = 120.0
    assert bool(notes) == (sc.burst_size > 1 and not sc.sweep_rates)
    cons = {c["kind"]: c for c in o["--constraint"]}
    assert cons["max_duration"]["seconds"] == pytest.approx(per) and cons["max_requests"]["count"] == 50
    d = o["--data"][0]
    assert d["kind"] == "synthetic_text"
    assert d["prompt_tokens"] == round(sc.prompt_words[0] * 1.5) and d["output_tokens"] == round(sc.max_tokens[0])
    assert ("prompt_tokens_stdev" in d) == (sc.prompt_words[1] > 0)
    assert ("output_tokens_stdev" in d) == (sc.max_tokens[1] > 0)
    assert o["--tokenizer"][0]["model"] == "/models/tok"
    assert o["--output"][0]["kind"] == "json"


def test_cli_prints_the_command(capsys):
    assert gl.main(["--scenario", "sweep", "--base-url", "http://127.0.0.1:9", "--duration", "60",
                    "--output-path", "/tmp/x.json"]) == 0
    printed = shlex.split(capsys.readouterr().out.strip())
    argv, _ = gl.guidellm_args(load_scenario("sweep"), "http://127.0.0.1:9", 60.0, output_path="/tmp/x.json")
    assert printed == ["guidellm"] + argv


def test_bad_values_rejected():
    with pytest.raises(ValueError, match="model"):
        gl.guidellm_args(load_scenario("chat"), "http://127.0.0.1:8000", 10, model="a,b")
    with pytest.raises(ValueError, match="duration"):
        gl.guidellm_args(load_scenario("chat"), "http://127.0.0.1:8000", 0)


# ---------------------------------------------------------------- converter on a report with known values

def _fake_report(rng: random.Random, rates=(1.0, 4.0)) -> tuple[dict, list[list[dict]]]:
    benches, truth = [], []
    for rate in rates:
        succ, errd, t = [], [], 1000.0
        for i in range(int(rng.uniform(20, 40))):
            ttft, itl, n = rng.uniform(0.01, 3.0), rng.uniform(0.001, 0.3), rng.randint(1, 40)
            e2e = ttft + itl * (n - 1)
            succ.append({"request_start_time": t, "request_end_time": t + e2e, "time_to_first_token_ms": ttft * 1e3,
                         "inter_token_latency_ms": itl * 1e3 if n > 1 else None, "output_tokens": n,
                         "prompt_tokens": rng.randint(5, 50), "info": {"error": None}})
            t += rng.uniform(0, 0.5)
        for code in (400, 400, 500):
            errd.append({"request_start_time": t, "request_end_time": t + 0.1, "time_to_first_token_ms": None,
                         "output_tokens": 0, "prompt_tokens": 3,
                         "info": {"error": f"HTTPStatusError: Server error '{code} X' for url 'http://h/v1'"}})
        inc = [{"request_start_time": t, "request_end_time": None, "output_tokens": 0, "info": {}}]
        benches.append({"duration": 12.5, "config": {"strategy": {"type_": "poisson", "rate": rate},
                                                     "backend": {"target": "http://h:1", "model": "m"}},
                        "requests": {"successful": succ, "errored": errd, "incomplete": inc, "total": None}})
        truth.append(succ)
    return {"metadata": {"version": 2, "guidellm_version": "0.8.1"}, "benchmarks": benches}, truth


def _expect(succ: list[dict], slo: dict, n_err: int) -> dict:
    ttft = [r["time_to_first_token_ms"] / 1e3 for r in succ]
    tpot = [(r["request_end_time"] - r["request_start_time"] - r["time_to_first_token_ms"] / 1e3)
            / (r["output_tokens"] - 1) for r in succ if r["output_tokens"] > 1]
    itl = np.repeat([r["inter_token_latency_ms"] / 1e3 for r in succ if r["output_tokens"] > 1],
                    [r["output_tokens"] - 1 for r in succ if r["output_tokens"] > 1])
    good = [r for r, t in zip(succ, ttft) if t <= slo["request"]["ttft_s"]
            and (r["output_tokens"] < 2 or (r["request_end_time"] - r["request_start_time"] - t)
                 / (r["output_tokens"] - 1) <= slo["request"]["tpot_s"])
            and r["request_end_time"] - r["request_start_time"] <= slo["request"]["e2e_s"]]
    return {"ttft": ttft, "tpot": tpot, "itl": itl, "good": len(good), "sent": len(succ) + n_err}


def test_to_report_matches_numpy_on_known_requests(tmp_path):
    slo = load_slo()
    d, truth = _fake_report(random.Random(3))
    p = tmp_path / "gl.json"
    p.write_text(json.dumps(d))
    out = to_report(p, slo)
    assert out["source"] == "guidellm" and len(out["levels"]) == 2
    for lv, succ, rate in zip(out["levels"], truth, (1.0, 4.0)):
        e = _expect(succ, slo, 3)
        assert lv["offered_rate"] == rate and lv["incomplete"] == 1
        assert (lv["sent"], lv["completed"], lv["failed"]) == (e["sent"], len(succ), 3)
        assert lv["errors"] == {"http_400": 2, "http_500": 1}
        for key, xs in (("ttft_s", e["ttft"]), ("tpot_s", e["tpot"]), ("itl_s", e["itl"])):
            for q in (50, 99):
                assert lv[key][f"p{q}"] == pytest.approx(float(np.percentile(xs, q)), rel=1e-9), (key, q)
        assert lv["itl_s"]["n"] == len(e["itl"])
        assert lv["request_throughput"] == pytest.approx(len(succ) / 12.5)
        assert lv["output_throughput"] == pytest.approx(sum(r["output_tokens"] for r in succ) / 12.5)
        assert lv["goodput"] == pytest.approx(e["good"] / 12.5)
        assert lv["slo"] == check_slo(lv, slo)
    allsucc = truth[0] + truth[1]
    assert out["completed"] == len(allsucc) and out["duration_s"] == pytest.approx(25.0)
    assert out["ttft_s"]["p99"] == pytest.approx(float(np.percentile(_expect(allsucc, slo, 6)["ttft"], 99)))


def test_to_report_rejects_other_formats(tmp_path):
    d, _ = _fake_report(random.Random(0), rates=(1.0,))
    d["metadata"]["version"] = 1
    p = tmp_path / "old.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"old\.json.*metadata\.version"):
        to_report(p)
    d["metadata"]["version"] = 2
    del d["benchmarks"][0]["duration"]
    with pytest.raises(ValueError, match=r"benchmarks\[0\].*duration"):
        to_report(d)
    assert gl.main(["--to-report", str(tmp_path / "missing.json")]) == 2


# ---------------------------------------------------------------- with guidellm installed

def test_command_parses_with_guidellm_cli(monkeypatch):
    pytest.importorskip("guidellm", reason="guidellm not installed (pip install guidellm)")
    import guidellm.entrypoints as entry
    from click.testing import CliRunner
    from guidellm.cli import cli
    seen = []

    async def capture(args, progress, console):  # replaces the benchmark run: parse + validate only
        seen.append(args)
    monkeypatch.setattr(entry, "benchmark_generative_text", capture)
    for name in SCENARIOS:
        sc = load_scenario(name)
        argv, _ = gl.guidellm_args(sc, "http://127.0.0.1:8000", 60.0, processor="/models/tok", max_requests=7)
        r = CliRunner().invoke(cli, argv + ["--disable-console"])
        assert r.exit_code == 0, (name, r.output, r.exception)
        spec = seen[-1].spec
        assert spec.backend.target == "http://127.0.0.1:8000" and spec.tokenizer.model == "/models/tok"
        if sc.sweep_rates:
            assert spec.profile.rate == list(sc.sweep_rates)
        elif sc.arrival == "concurrent":
            assert spec.profile.streams == [sc.concurrency]
        else:
            assert spec.profile.kind == sc.arrival and spec.profile.rate == [sc.rate]
        assert spec.data[0].prompt_tokens == round(sc.prompt_words[0])
        assert {c.kind for c in spec.constraints} == {"max_duration", "max_requests"}
    assert len(seen) == len(SCENARIOS)
    bad = CliRunner().invoke(cli, ["run", "--profile", "kind=concurrent,streams=0", "--disable-console"])
    assert bad.exit_code != 0  # the check above can fail: GuideLLM's validation is live


TTFT, ITL = 0.03, 0.01  # the mock's sleeps before the first token and between tokens (s)


def _mock_app():
    """OpenAI chat mock for GuideLLM: honours max_completion_tokens, streams usage (continuous + final)."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse
    app = base_app()

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 4)

        async def gen():
            await asyncio.sleep(TTFT)
            for i in range(n):
                if i:
                    await asyncio.sleep(ITL)
                yield "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "mock",
                                             "choices": [{"index": 0, "delta": {"content": f" t{i}"}}]}) + "\n\n"
            yield "data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "model": "mock", "choices": [],
                                         "usage": {"prompt_tokens": 16, "completion_tokens": n,
                                                   "total_tokens": 16 + n}}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    return app


@pytest.mark.slow
def test_real_guidellm_run_converts(tmp_path):
    pytest.importorskip("guidellm", reason="guidellm not installed (pip install guidellm)")
    from mxserve.models.tokenizer import train_tokenizer
    tok = tmp_path / "tok"
    train_tokenizer(" ".join(["the expert router selects two experts per token"] * 400), 300, tok)
    sc = load_scenario("chat")
    out_json = tmp_path / "gl.json"
    with serve_in_thread(_mock_app()) as url:
        argv, _ = gl.guidellm_args(sc.__class__(name="t", endpoint="chat", arrival="concurrent", concurrency=2,
                                                prompt_words=(16, 0), max_tokens=(6, 0)),
                                   url, 20.0, processor=str(tok), output_path=str(out_json), max_requests=8)
        r = subprocess.run([sys.executable, "-m", "guidellm"] + argv + ["--disable-console"], capture_output=True,
                           text=True, timeout=110, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    raw = json.loads(out_json.read_text())
    out = to_report(out_json, load_slo())
    b = raw["benchmarks"][0]["metrics"]
    assert out["completed"] == raw["benchmarks"][0]["scheduler_metrics"]["requests_made"]["successful"] > 0
    assert out["failed"] == 0
    assert out["ttft_s"]["mean"] == pytest.approx(b["time_to_first_token_ms"]["successful"]["mean"] / 1e3)
    assert out["itl_s"]["mean"] == pytest.approx(b["inter_token_latency_ms"]["successful"]["mean"] / 1e3)
    assert out["itl_s"]["n"] == b["inter_token_latency_ms"]["successful"]["count"]
    assert out["ttft_s"]["p50"] >= TTFT and out["tpot_s"]["p50"] >= ITL  # the mock sleeps at least this long
