"""``python -m mxserve.scheduler.layer_bench`` runs end to end on CPU (the GPU command's code path) and writes one
row per (budget, B) whose numbers are consistent with the cache's own counters."""
from __future__ import annotations

import json

import pytest

from mxserve.scheduler import layer_bench


@pytest.mark.slow   # ~50 s on 2 cores: fused_moe at the real 128 x 2048 x 768 geometry on CPU
def test_layer_bench_cpu_smoke(tmp_path):
    out = tmp_path / "lb.json"
    assert layer_bench.main(["--json", str(out), "--layers", "2", "--batches", "1,2", "--budgets", "0.25",
                             "--steps", "1", "--device", "cpu", "--pinned-gib", "0.01", "--routing", "uniform",
                             "--prefill-tokens", "0"]) == 0
    d = json.loads(out.read_text())
    assert d["layers"] == 2 and d["pinned_gbps"] > 0 and [r["tokens"] for r in d["rows"]] == [1, 2]
    for r in d["rows"]:
        assert r["step_ms"] > 0 and abs(r["tok_per_s"] - r["tokens"] / r["step_ms"] * 1e3) < 1e-6 * r["tok_per_s"]
        assert set(r["host_ms"]) == {"ensure", "einfo", "launch"} and all(v > 0 for v in r["host_ms"].values())
        assert 0 <= r["hit_rate"] <= 1 and r["compiles"] == 0 and r["h2d_mb_per_step"] > 0   # 25%: misses move bytes
