"""``metric_totals`` reads back every worker metric the side-channel collector serves, names with digits included
(issue 7: ``mxserve:expert_h2d_bytes_total`` was missing from the GPU test's scrape because of its regex)."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mxserve.metrics.collector import SideChannelCollector
from mxserve.metrics.definitions import WORKER_METRICS
from mxserve.metrics.scrape import metric_totals

OFFLOAD = {"expert_cache_hits": 235, "expert_cache_misses": 1449, "expert_h2d_bytes": 5_701_632,
           "expert_stall_seconds": 0.0149, "prefetch_issued": 158, "prefetch_useful": 151, "resident_experts": 11,
           "resident_planes": {"2": 3, "3": 0, "4": 8}, "host_pinned_bytes": 7_340_032}


class _Fixed(SideChannelCollector):
    def __init__(self, snaps):
        super().__init__(directory="unused", include_local=False)
        self._snaps = snaps

    def snapshots(self):
        return self._snaps


def _exposition(snaps) -> str:
    reg = CollectorRegistry()
    reg.register(_Fixed(snaps))
    return generate_latest(reg).decode()


def test_every_published_offload_metric_is_read_back():
    text = _exposition([{"model_name": "m", "engine": 0, "sections": {"offload": OFFLOAD}}])
    got = metric_totals(text)
    for key, v in OFFLOAD.items():
        name = WORKER_METRICS[key].name
        assert name in got, (name, sorted(got))
        assert got[name] == pytest.approx(sum(v.values()) if isinstance(v, dict) else v)
    assert got["mxserve:expert_h2d_bytes_total"] == OFFLOAD["expert_h2d_bytes"]


def test_totals_sum_label_sets_and_keep_the_prefix_only():
    snaps = [{"model_name": "m", "engine": e, "sections": {"offload": {"expert_h2d_bytes": 1000 * (e + 1)}}}
             for e in range(3)]
    text = _exposition(snaps) + "vllm:num_requests_running{model_name=\"m\"} 4.0\n"
    assert metric_totals(text) == {"mxserve:expert_h2d_bytes_total": 6000.0}
    assert metric_totals(text, prefix="vllm:") == {"vllm:num_requests_running": 4.0}


def test_bad_exposition_is_a_clear_error():
    with pytest.raises(ValueError, match="not a Prometheus text exposition"):
        metric_totals("mxserve:x{unterminated 1\n")
