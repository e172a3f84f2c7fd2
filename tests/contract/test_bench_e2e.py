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
    assert a.bench_command == "e2e" and a.batch_sizes == "1,8,32,256" and callable(a.func) and a.runner == "engine"


def test_targets_and_failed_rows():
    from mxserve.cli.bench import targets
    res = [{"variant": "bf16", "throughput": {1: 50.0, 32: 700.0}, "weight_gib": 10.0},
           {"variant": "gptq_w4", "throughput": {1: 100.0, 32: 1000.0}, "weight_gib": 4.0},
           {"variant": "mxmoe_w4", "throughput": {1: 110.0, 32: 990.0}, "weight_gib": 4.2},
           {"variant": "mxmoe_mix25", "throughput": {1: 140.0, 32: 1300.0}, "weight_gib": 2.9},
           {"variant": "fp8", "error": "boom"}]
    t = targets(res, [1, 32])
    assert t["mxmoe_w4_min_vs_gptq_w4"]["value"] == pytest.approx(0.99) and not t["mxmoe_w4_min_vs_gptq_w4"]["ok"]
    assert t["mxmoe_mix25_min_vs_gptq_w4"]["value"] == pytest.approx(1.3) and t["mxmoe_mix25_min_vs_gptq_w4"]["ok"]
    assert t["mxmoe_mix25_weights_vs_bf16"]["value"] == pytest.approx(0.29) and t["mxmoe_mix25_weights_vs_bf16"]["ok"]
    row = next(l for l in markdown_rows(res, [1, 32], "run").splitlines() if "| fp8 |" in l)
    assert "failed" in row


class _Out:
    def __init__(self, n):
        self.outputs = [type("C", (), {"token_ids": list(range(n))})()]


class _FakeLLM:
    """Stands in for vllm.LLM: 'generates' max_tokens per prompt after a fixed delay per call."""

    def __init__(self, short=False):
        self.calls, self.short = [], short
        self.model_config = type("M", (), {"get_vocab_size": lambda self: 1000})()

    def get_tokenizer(self):
        return list(range(500))

    def generate(self, prompts, sp, use_tqdm=False):
        import time
        self.calls.append((len(prompts), sp.max_tokens, max(max(p["prompt_token_ids"]) for p in prompts)))
        time.sleep(0.01)
        return [_Out(sp.max_tokens - (1 if self.short else 0)) for _ in prompts]


def test_runner_measure_counts_tokens(vllm_cpu):
    from mxserve.vllm_plugin.bench_runner import measure, parse_args
    a = parse_args(["--model", "m", "--json", "x", "--batch-sizes", "1,4", "--output-len", "32", "--input-len", "8",
                    "--ttft-iters", "3", "--warmup", "1"])
    llm = _FakeLLM()
    r = measure(llm, a)
    assert set(r["throughput"]) == {1, 4}
    assert r["throughput"][4] == pytest.approx(4 * 32 / r["elapsed_s"][4])
    # call 0: global warm-up; then per batch size an untimed 4-token pass at that batch's size, then the timed one
    assert [c[:2] for c in llm.calls[1:5]] == [(1, 4), (1, 32), (4, 4), (4, 32)] and all(c[2] < 500 for c in llm.calls)
    assert len(llm.calls) == 5 + 4 and r["ttft_ms"] >= 10.0
    with pytest.raises(RuntimeError, match="expected 32"):
        measure(_FakeLLM(short=True), a)


def test_engine_variant_parses_log(tmp_path, monkeypatch):
    import json
    import subprocess
    import types

    from mxserve.cli import bench

    class FakePopen:
        def __init__(self, cmd, stdout, **kw):
            self.cmd, self.pid = cmd, 999999
            stdout.write("INFO Model loading took 2.38 GiB memory and 3.1 seconds\n")
            stdout.flush()
            out = cmd[cmd.index("--json") + 1]
            json.dump({"throughput": {"1": 10.0, "8": 70.0}, "ttft_ms": 12.5, "startup_s": 40}, open(out, "w"))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(bench, "_kill_group", lambda p: None)
    a = types.SimpleNamespace(batch_sizes="1,8", input_len=8, output_len=16, engine_json="{}", variant_timeout=10)
    r = bench.bench_variant_engine("gptq_w4", "/m", a, str(tmp_path))
    assert r == {"variant": "gptq_w4", "throughput": {1: 10.0, 8: 70.0}, "ttft_ms": 12.5, "ttft_p50_ms": None,
                 "startup_s": 40, "weight_gib": 2.38}
    cmd = open(tmp_path / "gptq_w4-engine.log").readline()
    assert "--quantization gptq_marlin" in cmd
