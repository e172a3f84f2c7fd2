"""Metric definitions: naming rules enforced, unique names, one registry per app, exposition names as declared."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mxserve.metrics.definitions import (ALL_METRICS, ENGINE_METRICS, WORKER_METRICS, MetricSpec,
                                         create_engine_metrics, create_worker_metrics, exposition_names)


def test_names_unique_and_follow_conventions():
    names = exposition_names()
    assert len(names) == len(set(names))
    for s in ALL_METRICS:
        assert s.name.startswith("mxserve:") and not s.name.startswith("vllm:")
        assert s.labels[0] == "model_name"
        if s.kind == "counter":
            assert s.name.endswith("_total")
        if "latency" in s.name or "time" in s.name:
            assert s.name.endswith("_seconds") or s.name.endswith("_seconds_total")
    for s in WORKER_METRICS.values():
        assert s.labels[:2] == ("model_name", "engine")  # joins with vllm:* series


@pytest.mark.parametrize("kwargs, msg", [
    (dict(name="vllm:x_total", kind="counter", help="h"), "must start with"),
    (dict(name="mxserve:x", kind="counter", help="h"), "_total"),
    (dict(name="mxserve:x_total", kind="counter", help="h", labels=("engine",)), "model_name"),
    (dict(name="mxserve:cfg", kind="info", help="h"), "_info"),
    (dict(name="mxserve:lat_seconds", kind="histogram", help="h"), "buckets"),
])
def test_spec_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        MetricSpec(**kwargs)


def _families(reg):
    return {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}


def test_engine_metrics_per_registry_and_exposition():
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    m1, m2 = create_engine_metrics(r1), create_engine_metrics(r2)  # no duplicate-timeseries error
    m1.prompt_tokens.labels(model_name="a").inc(5)
    m1.ttft.labels(model_name="a").observe(0.03)
    m1.weight_bytes.labels(model_name="a", precision="int2").set(123)
    m1.requests.labels(model_name="a", finished_reason="stop").inc()
    text = generate_latest(r1).decode()
    assert 'mxserve:prompt_tokens_total{model_name="a"} 5.0' in text
    assert 'mxserve:weight_bytes{model_name="a",precision="int2"} 123.0' in text
    assert 'mxserve:time_to_first_token_seconds_count{model_name="a"} 1.0' in text
    assert "mxserve:prompt_tokens_total{" not in generate_latest(r2).decode()  # independent registries
    fams = _families(r1)
    for key, spec in ENGINE_METRICS.items():
        assert spec.base_name in fams, key
        assert fams[spec.base_name].type == ("gauge" if spec.kind == "info" else spec.kind)


def test_worker_metrics_live_objects_and_per_expert_opt_in():
    reg = CollectorRegistry()
    w = create_worker_metrics(reg, per_expert=True)
    w.expert_cache_hits.labels(model_name="m", engine="0", layer="1", expert="7").inc(2)
    assert 'mxserve:expert_cache_hits_total{engine="0",expert="7",layer="1",model_name="m"} 2.0' in \
        generate_latest(reg).decode()
    w2 = create_worker_metrics(CollectorRegistry())
    with pytest.raises(ValueError):
        w2.expert_cache_hits.labels(model_name="m", engine="0", layer="1", expert="7")
