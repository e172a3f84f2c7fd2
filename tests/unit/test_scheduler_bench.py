"""The offload benchmark's code path as a CPU smoke run (``--device cpu``: synchronous copies, no GPU numbers):
rows for every (budget, case), the issue's key pair first, JSON rewritten atomically, ``--max-seconds`` skipping."""
from __future__ import annotations

import json

from mxserve.scheduler.bench import _case_order, main

SMALL = ["--device", "cpu", "--layers", "2", "--experts", "8", "--batches", "4", "--prefill", "8",
         "--budgets", "1.0,0.5", "--steps", "1", "--warmup", "1"]


def test_case_order_runs_the_target_pair_first():
    cases = [(1, 8, 3, "decode"), (32, 8, 3, "decode"), (2048, 1, 1, "prefill")]
    order = _case_order([1.0, 0.5, 0.25], cases)
    assert order[:2] == [(1.0, cases[1]), (0.25, cases[1])]
    assert sorted(order) == sorted((b, c) for b in (1.0, 0.5, 0.25) for c in cases)   # each pair exactly once
    assert [c[3] for _, c in order[-3:]] == ["prefill"] * 3


def test_bench_cpu_smoke(tmp_path):
    out = tmp_path / "offload.json"
    assert main(SMALL + ["--json", str(out), "--png", str(tmp_path / "offload.png")]) == 0
    res = json.loads(out.read_text())
    got = {(r["phase"], r["tokens"], r["budget_fraction"]) for r in res["rows"]}
    assert got == {(p, t, b) for p, t in (("decode", 4), ("prefill", 8)) for b in (1.0, 0.5)}
    for r in res["rows"]:
        assert r["tok_per_s"] > 0 and 0.0 <= r["hit_rate"] <= 1.0
        assert sum(r["plane_mix"].values()) == r["tokens"] * 8 * 2 * r["steps"]     # T * top_k * layers * steps
        assert (r["h2d_gbytes"] == 0) == (r["budget_fraction"] == 1.0)               # preload made all resident
    assert res["summary"]["key_row"] == {"tokens": 4, "budget_fraction": 0.5}
    assert res["summary"]["key_vs_all_resident"] is not None and res["skipped"] == []
    assert (tmp_path / "offload.png").stat().st_size > 0


def test_bench_max_seconds_skips_instead_of_running(tmp_path):
    out = tmp_path / "offload.json"
    assert main(SMALL + ["--json", str(out), "--max-seconds", "0", "--no-sim"]) == 0
    res = json.loads(out.read_text())
    assert res["rows"] == [] and len(res["skipped"]) == 4 and res["summary"]["key_vs_all_resident"] is None
