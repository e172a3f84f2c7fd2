"""``layer_bench --routing``: uniform and synthetic (``traces.synth_trace``) router decisions through the real
``ExpertCache`` + slot-pool ``fused_moe`` on CPU (tiny geometry, 2 layers). Checks the row fields and derived
figures, that the synth look-ahead hands ``ensure`` the trace's predicted ids, that synth rows are reproducible
(``on_miss=wait``: the policy does not depend on wall-clock copy timing) and that skewed, local routing touches
fewer experts per layer-step than uniform routing at B=32."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from mxserve.scheduler import layer_bench
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.traces import synth_trace

BASE = ["--layers", "2", "--geometry", "tiny", "--device", "cpu", "--pinned-gib", "0.01", "--on-miss", "wait"]
FULL = BASE + ["--steps", "3", "--batches", "1,32", "--budgets", "0.5,1.0", "--prefill-tokens", "64"]
SYNTH_ONLY = BASE + ["--steps", "3", "--batches", "32", "--budgets", "0.5", "--prefill-tokens", "0",
                     "--routing", "synth"]
FIELDS = {"budget_fraction", "slots", "routing", "phase", "tokens", "steps", "step_ms", "tok_per_s", "layer_ms",
          "distinct_experts", "host_ms", "compiles", "hit_rate", "h2d_mb_per_step", "h2d_gbps", "h2d_bound_ms",
          "h2d_vs_pinned", "vs_all_resident", "degraded_per_step"}


def _run(tmp_path, name: str, args: list[str]) -> dict:
    out = tmp_path / name
    assert layer_bench.main(args + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("lb"), "full.json", FULL)


def _key(r: dict) -> tuple:
    return (layer_bench.routing_label(r["routing"]), r["phase"], r["tokens"], r["budget_fraction"])


def test_parse_routing_defaults_overrides_and_errors():
    defaults = {k: v.default for k, v in inspect.signature(synth_trace).parameters.items()
                if k in layer_bench.SYNTH_PARAMS}
    assert layer_bench.parse_routing("uniform") == {"name": "uniform"}
    assert layer_bench.parse_routing("synth") == {"name": "synth", **defaults}
    got = layer_bench.parse_routing("synth:zipf_a=1.3, locality=0.2,pred_acc=1,seed=7")
    assert got == {"name": "synth", **defaults, "zipf_a": 1.3, "locality": 0.2, "pred_acc": 1.0, "seed": 7}
    for bad in ("zipf", "uniform:seed=1", "synth:foo=1", "synth:locality", "synth:locality=2", "synth:seed=x",
                "synth:zipf_a=-1"):
        with pytest.raises(ValueError, match="--routing"):
            layer_bench.parse_routing(bad)


def test_default_routings_rows_and_fields(full):
    labels = {"uniform", layer_bench.routing_label(layer_bench.parse_routing("synth"))}
    want = {(lab, ph, t, b) for lab in labels for ph, t in (("decode", 1), ("decode", 32), ("prefill", 64))
            for b in (0.5, 1.0)}
    assert sorted(_key(r) for r in full["rows"]) == sorted(want)
    assert full["skipped"] == [] and full["failed"] == [] and len(full["build"]) == 2
    gbps = full["pinned_gbps"]
    assert gbps > 0
    ref = {_key(r)[:3]: r for r in full["rows"] if r["budget_fraction"] == 1.0}
    for r in full["rows"]:
        assert set(r) == FIELDS, _key(r)
        assert r["steps"] == (3 if r["phase"] == "decode" else 1)
        assert r["step_ms"] > 0 and r["tok_per_s"] == pytest.approx(r["tokens"] / r["step_ms"] * 1e3)
        assert r["h2d_bound_ms"] == pytest.approx(r["h2d_mb_per_step"] / gbps)
        assert r["h2d_gbps"] == pytest.approx(r["h2d_mb_per_step"] / r["step_ms"])   # MB/ms = GB/s
        assert r["h2d_vs_pinned"] == pytest.approx(r["h2d_gbps"] / gbps)
        assert r["vs_all_resident"] == pytest.approx(r["tok_per_s"] / ref[_key(r)[:3]]["tok_per_s"])
        assert 0.0 <= r["hit_rate"] <= 1.0 and r["compiles"] == 0 and r["degraded_per_step"] == 0  # on_miss=wait
        if r["budget_fraction"] == 1.0:       # the preload made every plane resident: nothing moves, all hits
            assert r["hit_rate"] == 1.0 and r["h2d_mb_per_step"] == 0 and r["vs_all_resident"] == 1.0
        assert r["distinct_experts"] <= full["geometry"]["experts"]
        if r["tokens"] == 1:                  # one token routes to exactly K distinct experts under both routings
            assert r["distinct_experts"] == full["geometry"]["top_k"]
    moved = [r for r in full["rows"] if r["budget_fraction"] == 0.5 and r["tokens"] == 32]
    assert len(moved) == 2 and all(r["h2d_mb_per_step"] > 0 and r["hit_rate"] < 1.0 for r in moved)


def test_synth_touches_fewer_experts_than_uniform_at_b32(full):
    by = {(r["routing"]["name"], r["budget_fraction"]): r for r in full["rows"]
          if r["phase"] == "decode" and r["tokens"] == 32}
    for b in (0.5, 1.0):
        assert by["synth", b]["distinct_experts"] < by["uniform", b]["distinct_experts"]
    assert by["synth", 0.5]["h2d_mb_per_step"] < by["uniform", 0.5]["h2d_mb_per_step"]


def test_synth_rows_are_reproducible(tmp_path):
    a = _run(tmp_path, "a.json", SYNTH_ONLY)["rows"]
    b = _run(tmp_path, "b.json", SYNTH_ONLY)["rows"]
    assert len(a) == len(b) == 1
    for k in ("hit_rate", "h2d_mb_per_step", "distinct_experts"):
        assert a[0][k] == b[0][k], k
    c = _run(tmp_path, "c.json", [x if x != "synth" else "synth:seed=1" for x in SYNTH_ONLY])["rows"]
    assert c[0]["distinct_experts"] != a[0]["distinct_experts"]          # the seed reaches the generator


def test_synth_lookahead_passes_the_trace_prediction(tmp_path, monkeypatch):
    calls = []
    orig = ExpertCache.ensure

    def spy(self, layer, topk_ids, next_ids=None):
        calls.append((layer, topk_ids.cpu().numpy().copy(), None if next_ids is None else next_ids.cpu().numpy()))
        return orig(self, layer, topk_ids, next_ids=next_ids)

    monkeypatch.setattr(ExpertCache, "ensure", spy)
    spec = "synth:pred_acc=0.5,seed=3"
    _run(tmp_path, "p.json", BASE + ["--steps", "1", "--batches", "8", "--budgets", "0.5", "--prefill-tokens", "0",
                                     "--routing", spec])
    r = layer_bench.parse_routing(spec)
    tr = synth_trace(layer_bench.DECODE_WARM_STEPS + 1, 2, 64, 4, 8,
                     **{k: r[k] for k in layer_bench.SYNTH_PARAMS})
    assert [c[0] for c in calls] == [0, 1] * tr.num_steps
    for i, (layer, ids, nxt) in enumerate(calls):
        s = i // 2
        np.testing.assert_array_equal(ids, tr.topk[s, layer])
        if layer == 0:
            np.testing.assert_array_equal(nxt, tr.pred[s, 1])
        else:
            assert nxt is None
    assert not np.array_equal(tr.pred, tr.topk)        # pred_acc 0.5: the prediction is not the routing itself


def test_max_seconds_skips_rows_instead_of_running(tmp_path):
    d = _run(tmp_path, "s.json", BASE + ["--max-seconds", "0", "--batches", "1,8", "--budgets", "0.5,1.0"])
    assert d["rows"] == [] and d["build"] == []
    assert sorted((s["routing"]["name"], s["phase"], s["tokens"], s["budget_fraction"]) for s in d["skipped"]) == \
        sorted((n, ph, t, b) for n in ("synth", "uniform") for ph, t in (("decode", 1), ("decode", 8),
                                                                         ("prefill", 2048)) for b in (0.5, 1.0))
    assert {s["reason"] for s in d["skipped"]} == {"--max-seconds"}
