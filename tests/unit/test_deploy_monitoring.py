"""deploy/monitoring: every series the dashboard and alerts query exists (mxserve: names from
mxserve.metrics.definitions, vllm: names from the installed vLLM's metric logger source), rules are well formed."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
import yaml

from mxserve.metrics.definitions import ALL_METRICS

REPO = pathlib.Path(__file__).resolve().parents[2]
MON = REPO / "deploy" / "monitoring"
NAME_RE = re.compile(r"\b((?:vllm|mxserve):[a-zA-Z_][a-zA-Z0-9_]*)")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def _exprs() -> list[str]:
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((MON / "prometheus-rules.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return exprs


def _families(name: str) -> set[str]:
    """Candidate family names for an exposition sample name (strip one histogram/counter suffix)."""
    out = {name}
    for s in SUFFIXES:
        if name.endswith(s):
            out.add(name[: -len(s)])
    return out


def _vllm_families() -> set[str]:
    vllm = pytest.importorskip("vllm", reason="vllm not installed")
    src = (pathlib.Path(vllm.__file__).parent / "v1" / "metrics" / "loggers.py").read_text()
    return set(re.findall(r'name="(vllm:[a-z_]+)"', src))


def test_every_queried_series_exists():
    ours = {s.base_name for s in ALL_METRICS} | {s.name for s in ALL_METRICS}
    theirs = _vllm_families()
    assert "vllm:num_requests_waiting" in theirs  # the source scan works
    used = {n for e in _exprs() for n in NAME_RE.findall(e)}
    assert any(n.startswith("mxserve:") for n in used) and any(n.startswith("vllm:") for n in used)
    unknown = [n for n in used if not (_families(n) & (ours | theirs))]
    assert not unknown, f"dashboard/alerts query series nobody exports: {unknown}"


def test_dashboard_covers_worker_metrics():
    text = (MON / "grafana-dashboard.json").read_text()
    for must in ("mxserve:expert_cache_hits_total", "mxserve:expert_h2d_bytes_total", "mxserve:gpu_resident_experts",
                 "mxserve:worker_weight_bytes", "mxserve:worker_kv_cache_bits_per_element",
                 "mxserve:quant_config_info", "vllm:time_to_first_token_seconds_bucket"):
        assert must in text, must


def test_rules_well_formed():
    rules = yaml.safe_load((MON / "prometheus-rules.yaml").read_text())
    names = []
    for g in rules["groups"]:
        for r in g["rules"]:
            assert set(r) >= {"alert", "expr", "labels", "annotations"}, r.get("alert")
            assert r["labels"]["severity"] in ("info", "warning", "critical")
            assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
            names.append(r["alert"])
    assert len(names) == len(set(names))
