"""Host work per engine step of the packed-KV backend on the `vllm bench throughput` workload (issue #6, session 6:
was K2V1.5 slow in its first steps?). The schedule is vLLM 0.26's chunked prefill (decodes first); the Triton kernels
are launch recorders, so the CPU runs exactly the host code the H200 runs."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from mxserve.vllm_plugin.kv.step_trace import schedule, trace  # noqa: E402


def test_schedule_is_vllm_chunked_prefill():
    steps = schedule(64, 8201, 256, 16384)
    got = {}
    for st in steps:
        assert sum(c.new for c in st) <= 16384
        kinds = [c.new > 1 for c in st]
        assert kinds == sorted(kinds)  # decodes first (reorder_batch_threshold 1)
        for c in st:
            assert c.computed == got.get(c.req, 0)  # chunks are contiguous
            got[c.req] = c.computed + c.new
    assert got == {r: 8201 + 255 for r in range(64)}
    assert [(c.req, c.new) for c in steps[0]] == [(0, 8201), (1, 16384 - 8201)]  # two prompts, the 2nd split
    assert [(c.req, c.computed, c.new) for c in steps[1][:2]] == [(0, 8201, 1), (1, 8183, 18)]
    full = [s for s in steps if len(s) == 64 and all(c.new == 1 for c in s)]  # decode at B=64 once all are in
    assert len(full) > 200 and all(c.new == 1 for c in steps[-1]) and len(steps[-1]) == 1  # staggered finish
    with pytest.raises(ValueError, match="must be > 0"):
        schedule(1, 0, 1, 1)


def _signature(row):
    return row["decodes"] > 0, row["prefills"] - row["prefills_with_context"], row["prefills_with_context"]


def test_host_work_is_bounded_per_step():
    """Two prompt lengths (2x apart, same heads as Qwen3-30B-A3B): equal-shaped steps make equal torch calls (no
    loop over tokens or context), decode steps read nothing on the host, every host read is one of vLLM's own
    reads of query_start_loc_cpu or prefill's two ``tolist`` of the ``*_cpu`` metadata, and launches are 1 store
    + 1 decode + 1 merge per step."""
    calls = {}
    for prompt in (40, 80):
        res = trace(num_reqs=6, prompt_len=prompt, out_len=3, budget=2 * prompt - 8, page=16, dtype=torch.float32)
        rows = res["steps"]
        assert {r["kind"] for r in rows} == {"prefill", "mixed", "decode"}
        for r in rows:
            key = _signature(r)
            assert calls.setdefault(key, r["calls"]) == r["calls"], (prompt, r)
            assert r["launches"].get("kv_store") == 1
            if r["decodes"]:
                assert r["launches"].get("paged_decode") == 1 and r["launches"].get("merge") == 1
            if r["kind"] == "decode":
                assert r["syncs"] == {}
            for site in r["syncs"]:
                assert site.split(" at ")[1].rsplit(":", 1)[0] in ("backends/utils.py", "attention/prefill.py"), site
            ours = sum(n for s, n in r["syncs"].items() if "attention/prefill.py" in s)
            assert ours == (2 if r["prefills"] else 0)
    decode_calls = {c for k, c in calls.items() if k[1:] == (0, 0)}
    assert len(decode_calls) == 1  # one decode step costs the same at any batch size and context


def test_real_kernel_path_runs_the_whole_workload():
    res = trace(num_reqs=3, prompt_len=24, out_len=3, budget=40, hq=4, h=2, d=64, label="K4V4", stub_kernels=False,
                dtype=torch.float32)
    assert res["config"]["stub_kernels"] is False and res["totals"]["decode"]["steps"] >= 1
    assert sum(r["tokens"] for r in res["steps"]) == 3 * (24 + 2)
    with pytest.raises(ValueError, match="label"):
        trace(num_reqs=1, prompt_len=2, out_len=1, budget=4, label="int4")
