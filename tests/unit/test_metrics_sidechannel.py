"""Side channel: atomic per-pid snapshots, validation, aggregation across real processes, stale/dead pid drop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mxserve.metrics import sidechannel
from mxserve.metrics.collector import SideChannelCollector, aggregate


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch, tmp_path):
    monkeypatch.setenv("MXSERVE_METRICS_DIR", str(tmp_path))
    sidechannel._reset_for_tests()
    yield
    sidechannel._reset_for_tests()


def _scrape(collector) -> dict[tuple[str, tuple], float]:
    reg = CollectorRegistry()
    reg.register(collector)
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_flush_is_atomic_and_readable(tmp_path):
    sidechannel.configure(model_name="m", engine=1)
    sidechannel.publish("offload", {"expert_cache_hits": 7, "expert_h2d_bytes": 1024}, min_interval_s=0)
    path = tmp_path / f"{os.getpid()}.json"
    snap = json.loads(path.read_text())
    assert snap["model_name"] == "m" and snap["engine"] == 1
    assert snap["sections"]["offload"] == {"expert_cache_hits": 7.0, "expert_h2d_bytes": 1024.0}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # temp file renamed away


def test_publish_throttles_writes(tmp_path):
    sidechannel.publish("a", {"expert_cache_hits": 1}, min_interval_s=0)
    sidechannel.publish("a", {"expert_cache_hits": 2}, min_interval_s=3600)
    on_disk = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
    assert on_disk["sections"]["a"]["expert_cache_hits"] == 1.0  # second publish not yet written
    assert sidechannel.local_snapshot()["sections"]["a"]["expert_cache_hits"] == 2.0
    sidechannel.flush()
    assert json.loads((tmp_path / f"{os.getpid()}.json").read_text())["sections"]["a"]["expert_cache_hits"] == 2.0


@pytest.mark.parametrize("values, msg", [
    ({"expert_cache_hitz": 1}, "not a worker metric"),
    ({"expert_cache_hits": "3"}, "int/float"),
    ({"expert_cache_hits": -1}, "non-negative"),
    ({"expert_h2d_bytes": {"a": 1}}, "no extra labels"),
    ({"weight_bytes": 5}, "labels"),
    ({"expert_cache_misses": {"17": 1}}, "layer/expert"),
    ({"quant_config": {"kv_bits": "2"}}, "exactly the labels"),
])
def test_publish_rejects_bad_payload(values, msg):
    with pytest.raises(ValueError, match=msg):
        sidechannel.publish("s", values)


def test_aggregate_sums_sections_and_ranks_max_for_ratios():
    snaps = [
        {"model_name": "m", "engine": 0, "sections": {
            "offload": {"expert_cache_hits": 10.0, "resident_planes": {"2": 3.0, "4": 1.0}},
            "kv": {"kv_cache_bits_per_element": 2.25, "weight_bytes": {"int2": 100.0}},
            "quant": {"weight_bytes": {"int2": 5.0, "bf16": 7.0}}}},
        {"model_name": "m", "engine": 0, "sections": {  # second TP rank of engine 0
            "offload": {"expert_cache_hits": 4.0, "resident_planes": {"2": 1.0}},
            "kv": {"kv_cache_bits_per_element": 2.5}}},
        {"model_name": "m", "engine": 1, "sections": {"offload": {"expert_cache_hits": 1.0}}},
    ]
    agg = aggregate(snaps)
    assert agg["expert_cache_hits"] == {("m", "0"): 14.0, ("m", "1"): 1.0}
    assert agg["resident_planes"] == {("m", "0", "2"): 4.0, ("m", "0", "4"): 1.0}
    assert agg["kv_cache_bits_per_element"] == {("m", "0"): 2.5}
    assert agg["weight_bytes"] == {("m", "0", "int2"): 105.0, ("m", "0", "bf16"): 7.0}


def test_per_expert_labels_are_opt_in():
    snaps = [{"model_name": "m", "engine": 0,
              "sections": {"o": {"expert_cache_misses": {"0/1": 2.0, "0/2": 3.0, "1/1": 5.0}}}}]
    assert aggregate(snaps)["expert_cache_misses"] == {("m", "0"): 10.0}
    pe = aggregate(snaps, per_expert=True)["expert_cache_misses"]
    assert pe[("m", "0", "0", "2")] == 3.0 and len(pe) == 3


_CHILD = textwrap.dedent("""
    import sys, time
    from mxserve.metrics import sidechannel
    sidechannel.configure(model_name="tiny", engine=0)
    hits = int(sys.argv[1])
    sidechannel.publish("offload", {"expert_cache_hits": hits, "resident_experts": 4,
                                    "kv_cache_bits_per_element": 2.0 + hits / 100}, min_interval_s=0)
    sidechannel.publish("quant", {"quant_config": {"weight_bits_mix": "2:1.0", "kv_bits": "2",
                                  "offload": "on", "scheme": "int2"}}, min_interval_s=0)
    print("ready", flush=True)
    sys.stdin.readline()
""")


def _spawn(hits: int, env) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(hits)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=env, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_collector_aggregates_live_processes_and_drops_dead(tmp_path):
    env = dict(os.environ, MXSERVE_METRICS_DIR=str(tmp_path))
    a, b = _spawn(10, env), _spawn(32, env)
    try:
        col = SideChannelCollector(include_local=False)
        s = _scrape(col)
        base = (("engine", "0"), ("model_name", "tiny"))
        assert s[("mxserve:expert_cache_hits_total", base)] == 42.0
        assert s[("mxserve:gpu_resident_experts", base)] == 8.0
        assert s[("mxserve:worker_kv_cache_bits_per_element", base)] == pytest.approx(2.32)
        info = [k for k in s if k[0] == "mxserve:quant_config_info"]
        assert len(info) == 1 and s[info[0]] == 1.0 and ("kv_bits", "2") in info[0][1]
        b.stdin.close()
        b.wait(timeout=10)
        s = _scrape(col)
        assert s[("mxserve:expert_cache_hits_total", base)] == 10.0
        assert not (tmp_path / f"{b.pid}.json").exists()  # dead pid's file removed
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=10)


def test_stale_snapshot_is_dropped(tmp_path):
    sidechannel.publish("o", {"expert_cache_hits": 3}, min_interval_s=0)
    path = tmp_path / f"{os.getpid()}.json"
    snap = json.loads(path.read_text())
    assert len(sidechannel.read_snapshots(str(tmp_path), stale_after_s=60)) == 1
    snap["time"] = time.time() - 120
    path.write_text(json.dumps(snap))
    assert sidechannel.read_snapshots(str(tmp_path), stale_after_s=60) == []


def test_local_snapshot_without_directory(monkeypatch):
    monkeypatch.delenv("MXSERVE_METRICS_DIR")
    sidechannel.set_context_provider(lambda: ("ctx-model", 3))
    sidechannel.publish("o", {"expert_h2d_bytes": 64})
    s = _scrape(SideChannelCollector())
    assert s[("mxserve:expert_h2d_bytes_total", (("engine", "3"), ("model_name", "ctx-model")))] == 64.0
