"""``mxserve bench e2e`` plumbing on CPU: the mxmoe benchmark plans parse and hit their bit budgets, the markdown
table computes ratios from the numbers it is given, and the CLI registers the subcommand."""
from __future__ import annotations

import pytest

from mxserve.cli.bench import markdown_rows, mxmoe_plan
from mxserve.config import MxMoEConfig


@pytest.mark.parametrize("variant,lo,hi", [("mxmoe_w4", 4.25, 4.25), ("mxmoe_mix25", 2.4, 2.6)])
def test_plans_parse_and_meet_budget(variant, lo, hi):
    cfg = MxMoEConfig.from_dict(mxmoe_plan(variant, layers=4, experts=128))
    bits = [s.bits_per_weight for p in cfg.experts.values() for s in (*p.gate_up, *p.down)]
    assert lo <= sum(bits) / len(bits) <= hi
    assert len(cfg.experts) == 4 and len(cfg.modules) == 16


def test_markdown_ratios():
    res = [{"variant": "gptq_w4", "throughput": {1: 100.0, 32: 1000.0}, "ttft_ms": 5.0, "weight_gib": 2.0},
           {"variant": "bf16", "throughput": {1: 50.0, 32: 700.0}, "ttft_ms": 4.0, "weight_gib": 8.0},
           {"variant": "mxmoe_w4", "throughput": {1: 120.0, 32: 900.0}, "ttft_ms": 5.5, "weight_gib": 2.2}]
    md = markdown_rows(res, [1, 32], "run").splitlines()
    row = next(l for l in md if "mxmoe_w4" in l)
    assert "| 0.90x |" in row and "| 0.28x |" in row and "| 120 | 900 |" in row


def test_cli_registers_e2e():
    from mxserve.cli.main import build_parser
    a = build_parser("bench").parse_args(["bench", "e2e", "--out", "o", "--json", "j.json"])
    assert a.bench_command == "e2e" and a.batch_sizes == "1,8,32,256" and callable(a.func)
