"""GPU: `vllm serve CKPT --quantization mxmoe` exposes mxserve: worker metrics next to vllm: series on /metrics,
with the same model_name label, and they move under load.

Run on the GPU machine (one command; writes $OUT/metrics_gpu.json):
    MXSERVE_TEST_CHECKPOINT=/path/to/tiny-mxmoe python -m pytest -q -m gpu tests/integration/test_metrics_gpu.py
"""
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from loadtests import run
from loadtests.scenario import Scenario, load_slo

CKPT = os.environ.get("MXSERVE_TEST_CHECKPOINT")
pytestmark = pytest.mark.skipif(not CKPT, reason="set MXSERVE_TEST_CHECKPOINT to an mxmoe checkpoint directory")
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$', re.M)


def _scrape(url):
    out = {}
    for name, labels, v in SAMPLE.findall(httpx.get(url + "/metrics", timeout=10).text):
        out.setdefault(name, []).append((labels, float(v)))
    return out


def _total(m, name):
    return sum(v for _, v in m.get(name, []))


@pytest.fixture(scope="module")
def server():
    from tests.conftest import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", CKPT, "--quantization", "mxmoe",
           "--served-model-name", "tiny-mxmoe", "--port", str(port), "--max-model-len", "1024", "--enforce-eager"]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited rc={proc.returncode}: {proc.stdout.read()[-4000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("vllm serve did not become healthy in 600 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_mxserve_metrics_on_vllm_endpoint(server):
    before = _scrape(server)
    sc = Scenario(name="gpu", endpoint="chat", arrival="concurrent", concurrency=8, prompt_words=(128, 32),
                  max_tokens=(64, 16))

    async def load_and_scrape():
        task = asyncio.create_task(run.run(server, sc, duration_s=20.0, slo=load_slo()))
        await asyncio.sleep(10)
        during = await asyncio.to_thread(_scrape, server)
        return await task, during

    report, during = asyncio.run(load_and_scrape())
    after = _scrape(server)
    mx = sorted(n for n in after if n.startswith("mxserve:"))
    result = {"load": report, "mxserve_series": mx,
              "values": {n: after[n] for n in mx},
              "vllm_generation_tokens_delta": _total(after, "vllm:generation_tokens_total")
              - _total(before, "vllm:generation_tokens_total")}
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "metrics_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
    assert report["failed"] == 0 and report["completed"] > 0
    assert result["vllm_generation_tokens_delta"] > 0
    assert "vllm:num_requests_running" in during  # vLLM's own metrics survived (no PROMETHEUS_MULTIPROC_DIR)
    assert "mxserve:quant_config_info" in after and "mxserve:worker_weight_bytes" in after, mx
    assert all('model_name="tiny-mxmoe"' in lbl and 'engine="' in lbl for n in mx for lbl, _ in after[n])
    assert _total(after, "mxserve:worker_weight_bytes") > 0
    moving = [n for n in mx if n.endswith("_total") and _total(after, n) > _total(before, n)]
    if "mxserve:expert_cache_hits_total" in after:  # offload enabled in the checkpoint: the cache must be used
        assert {"mxserve:expert_cache_hits_total", "mxserve:expert_cache_misses_total"} & set(moving), moving
