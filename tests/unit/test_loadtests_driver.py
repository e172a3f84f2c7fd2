"""loadtests driver, report and soak against a loopback mock OpenAI server with known TTFT/ITL."""

import asyncio
import json
import random

import numpy as np
import pytest

from loadtests import report, run, soak
from loadtests.client import RequestResult
from loadtests.scenario import Scenario, load_scenario, load_slo
from tests.helpers.mock_openai import base_app, serve_in_thread

TTFT, ITL, NTOK = 0.05, 0.01, 5


def _mock_app():
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = base_app()

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import PlainTextResponse
        return PlainTextResponse("process_resident_memory_bytes 1000000.0\n")

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        if body.get("temperature", 0) < 0 or body.get("max_tokens", 1) < 1:
            return JSONResponse({"error": {"message": "bad", "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)
        if len(body["messages"][0]["content"]) > 100_000:
            return JSONResponse({"error": {"message": "too long", "type": "BadRequestError", "param": None,
                                           "code": 400}}, status_code=400)

        async def gen():
            await asyncio.sleep(TTFT)
            for i in range(NTOK):
                if i:
                    await asyncio.sleep(ITL)
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]}) + "\n\n"
            yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": NTOK}})
            yield "\n\ndata: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    return app


@pytest.fixture(scope="module")
def mock_url():
    with serve_in_thread(_mock_app()) as url:
        yield url


def test_percentile_matches_numpy():
    rng = random.Random(1)
    xs = [rng.random() for _ in range(101)]
    for q in (0, 50, 90, 99, 100):
        assert report.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert report.percentile([], 50) is None


def test_tpot_goodput_and_slo():
    r = RequestResult(start=0.0, end=1.0, ok=True, first_token=0.2, chunk_times=[0.2, 0.6, 1.0], output_tokens=3)
    assert r.ttft == 0.2 and r.tpot == pytest.approx(0.4) and r.itls == pytest.approx([0.4, 0.4])
    bad = RequestResult(start=0.0, end=1.0, status=500, error="boom")
    fault = RequestResult(start=0.0, end=0.1, status=400, expected_failure=True)
    slo = {"request": {"ttft_s": 0.5, "tpot_s": 0.3}, "aggregate": {"error_rate": 0.6, "min_goodput_fraction": 0.6}}
    s = report.summarize([r, bad, fault], 2.0, slo)
    assert s["sent"] == 2 and s["failed"] == 1 and s["faults_injected"] == 1 and s["errors"] == {"http_500": 1}
    assert s["goodput"] == 0.0  # tpot 0.4 > 0.3
    assert s["slo"]["error_rate"]["ok"] and not s["slo"]["min_goodput_fraction"]["ok"] and not s["slo"]["pass"]


def test_scenarios_load_and_validate(tmp_path):
    for name in ("chat", "long_prompt", "bursty", "sweep"):
        sc = load_scenario(name)
        prompt, mt = sc.sample(random.Random(0))
        assert prompt and mt >= 1
    assert load_scenario("sweep").sweep_rates
    p = tmp_path / "bad.yaml"
    p.write_text("endpoint: chat\narrival: {kind: zigzag}\n")
    with pytest.raises(ValueError, match="arrival.kind"):
        load_scenario(str(p))
    with pytest.raises(FileNotFoundError, match="known"):
        load_scenario("nope")
    assert set(load_slo()) >= {"request", "aggregate"}


def test_closed_loop_measures_known_latencies(mock_url, tmp_path):
    out_json = tmp_path / "out.json"
    rc = run.main(["--base-url", mock_url, "--scenario", "chat", "--duration", "1.0", "--json", str(out_json),
                   "--no-fail-on-slo"])
    assert rc == 0
    out = json.loads(out_json.read_text())
    assert out["model"] == "mock" and out["failed"] == 0 and out["completed"] >= 8
    assert TTFT <= out["ttft_s"]["p50"] < TTFT + 0.1
    assert ITL <= out["itl_s"]["p50"] < ITL + 0.05
    assert out["tpot_s"]["p50"] == pytest.approx(ITL, abs=0.02)
    assert out["output_throughput"] == pytest.approx(out["request_throughput"] * NTOK, rel=0.01)


def test_sweep_writes_png(mock_url, tmp_path):
    sc = Scenario(name="s", endpoint="chat", arrival="poisson", sweep_rates=(5.0, 20.0))
    out = asyncio.run(run.run(mock_url, sc, 1.0, slo=load_slo()))
    assert [lv["offered_rate"] for lv in out["levels"]] == [5.0, 20.0]
    assert out["levels"][1]["sent"] > out["levels"][0]["sent"]  # offered load honoured
    png = report.plot_latency_vs_load(out["levels"], str(tmp_path / "l.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| 20 |" in report.markdown(out, "t")


def test_soak_refuses_non_loopback():
    for url in ("http://10.0.0.5:8000", "http://example.com", "https://8.8.8.8"):
        with pytest.raises(ValueError, match="loopback"):
            asyncio.run(soak.soak(url, 1, 1))
    soak.assert_loopback("http://127.0.0.2:1")
    soak.assert_loopback("http://[::1]:1")
    with pytest.raises(ValueError, match="duration"):
        asyncio.run(soak.soak("http://127.0.0.1:1", 10 ** 9, 1))


def test_soak_with_faults(mock_url):
    out = asyncio.run(soak.soak(mock_url, duration_s=2.5, max_requests=500, concurrency=2, fault_every_s=0.4,
                                burst=4, oversize_words=30_000))
    kinds = {f["fault"] for f in out["faults"]}
    assert kinds == set(soak.FAULTS)
    assert out["faults_ok"], out["faults"]
    assert out["lost_requests"] == 0 and out["healthy_after"] and out["rss_samples"]
    assert out["faults_injected"] >= 3
