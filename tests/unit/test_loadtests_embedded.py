"""CI load test: the short, bounded version of the load + soak/fault run against the embedded engine
(``mxserve serve`` without vLLM) on a tiny random MoE. Checks client numbers against the server's own
``mxserve:`` metrics, that no request is lost and that the server stays healthy after the faults."""
import asyncio
import re

import httpx
import pytest

serve_server = pytest.importorskip("mxserve.serve.server", reason="embedded server (mxserve.serve) not importable yet")
tiny = pytest.importorskip("mxserve.models.tiny", reason="mxserve.models.tiny not importable yet")

from loadtests import run, soak  # noqa: E402
from loadtests.scenario import Scenario, load_slo  # noqa: E402


@pytest.fixture(scope="module")
def embedded_url(tmp_path_factory):
    model_dir = tiny.make_tiny("qwen3_moe", tmp_path_factory.mktemp("lt") / "tiny", layers=2, experts=8, top_k=2,
                               hidden=64, inter=32, vocab=512, heads=4, kv_heads=2, head_dim=16)
    opts = serve_server.EngineOptions(max_num_seqs=8, max_waiting=256, max_model_len=512, threads=1)
    state = serve_server.build_state(model_dir, served_name="tiny", opts=opts)
    try:
        with serve_server.BackgroundServer(state) as url:
            yield url
    finally:
        state.engine.shutdown()


def _metric(text: str, name: str) -> float:
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert vals, f"{name} not on /metrics"
    return sum(vals)


@pytest.mark.slow
def test_embedded_load_and_soak(embedded_url):
    before = httpx.get(embedded_url + "/metrics").text
    sc = Scenario(name="ci", endpoint="chat", arrival="concurrent", concurrency=4, prompt_words=(24, 4),
                  max_tokens=(8, 2))
    out = asyncio.run(run.run(embedded_url, sc, duration_s=6.0, max_requests=40, timeout_s=15.0, slo=load_slo()))
    assert out["failed"] == 0 and out["completed"] >= 4, out["errors"]
    assert out["ttft_s"]["p50"] is not None and out["tpot_s"]["p99"] is not None and out["itl_s"]["p50"] is not None
    after = httpx.get(embedded_url + "/metrics").text
    gen = _metric(after, "mxserve:generation_tokens_total") - (
        _metric(before, "mxserve:generation_tokens_total") if "mxserve:generation_tokens_total{" in before else 0)
    client_tokens = out["output_throughput"] * out["duration_s"]
    assert gen == pytest.approx(client_tokens, rel=0.01)  # server counted exactly what the clients received

    s = asyncio.run(soak.soak(embedded_url, duration_s=10.0, max_requests=200, concurrency=2, fault_every_s=1.0,
                              burst=12, oversize_words=50_000, timeout_s=15.0))
    assert {f["fault"] for f in s["faults"]} == set(soak.FAULTS)
    assert s["faults_ok"], s["faults"]
    assert s["lost_requests"] == 0, s["errors"]
    assert s["healthy_after"]
