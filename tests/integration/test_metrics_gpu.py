"""GPU: `vllm serve CKPT --quantization mxmoe` exposes mxserve: worker metrics next to vllm: series on /metrics,
with the same model_name label, and they move under load.

Run on the GPU machine (one command; writes $OUT/metrics_gpu.json). Without MXSERVE_TEST_CHECKPOINT a tiny uniform-W4
Qwen3-MoE checkpoint is made and quantized here (seconds), so it runs in the same session as the other GPU tests:
    python -m pytest -q -m gpu tests/integration/test_metrics_gpu.py
"""
import asyncio
import json
import os
import re

import httpx
import pytest

from loadtests import run
from loadtests.scenario import Scenario, load_slo
from mxserve import envs

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$', re.M)
SERVER_ARGS = ["--quantization", "mxmoe", "--max-model-len", "1024", "--gpu-memory-utilization", "0.15",
               "--max-num-seqs", "16"]  # default torch.compile + CUDA graphs, as served


def _scrape(url):
    out = {}
    for name, labels, v in SAMPLE.findall(httpx.get(url + "/metrics", timeout=10).text):
        out.setdefault(name, []).append((labels, float(v)))
    return out


def _total(m, name):
    return sum(v for _, v in m.get(name, []))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """MXSERVE_TEST_CHECKPOINT, or a tiny uniform-W4 (int4 g64 asym RTN) Qwen3-MoE made here."""
    ckpt = envs.test_checkpoint()
    if ckpt:
        return ckpt
    from mxserve.models.tiny import make_tiny
    from mxserve.quant.api import quantize_checkpoint
    root = tmp_path_factory.mktemp("metrics_ckpt")
    src = make_tiny("qwen3_moe", root / "src", layers=2, experts=8, top_k=2, hidden=256, inter=128, vocab=1024,
                    heads=4, kv_heads=2, head_dim=64)
    quantize_checkpoint(str(src), str(root / "w4"), bits=4.5, calib=None, method="rtn", uniform=True,
                        group_size=64, progress=False)
    return str(root / "w4")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    from mxserve.vllm_plugin.server import VllmServer
    logs = tmp_path_factory.mktemp("metrics_logs")
    # PROMETHEUS_MULTIPROC_DIR would switch /metrics to the multiprocess registry: make sure it is unset
    with VllmServer(checkpoint, SERVER_ARGS, log_dir=str(logs), served_name="tiny-mxmoe", label="metrics",
                    env={"PROMETHEUS_MULTIPROC_DIR": None}) as srv:
        srv.wait_healthy(600)
        yield srv.url


def test_mxserve_metrics_on_vllm_endpoint(server):
    sc = Scenario(name="gpu", endpoint="chat", arrival="concurrent", concurrency=8, prompt_words=(128, 32),
                  max_tokens=(64, 16))
    # untimed warm-up (first-use compiles, allocator growth): the SLO below is about steady-state serving
    asyncio.run(run.run(server, sc, duration_s=5.0, slo=None))
    before = _scrape(server)

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
    precisions = {re.search(r'precision="([^"]*)"', lbl).group(1) for lbl, _ in after["mxserve:worker_weight_bytes"]}
    assert any(p.startswith("int") for p in precisions) and "bf16" in precisions, precisions  # quantized + embeddings
    moving = [n for n in mx if n.endswith("_total") and _total(after, n) > _total(before, n)]
    if "mxserve:expert_cache_hits_total" in after:  # offload enabled in the checkpoint: the cache must be used
        assert {"mxserve:expert_cache_hits_total", "mxserve:expert_cache_misses_total"} & set(moving), moving
