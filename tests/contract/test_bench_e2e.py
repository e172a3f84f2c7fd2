"""``mxserve bench e2e`` plumbing on CPU: the mxmoe benchmark plans parse and hit their bit budgets, the markdown
table computes ratios from the numbers it is given, and the CLI registers the subcommand."""
from __future__ import annotations

import pytest
import torch

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
    res[2]["windows"] = {1: {"spread": 0.04, "short": False}, 32: {"spread": 0.12, "short": True}}
    res[2]["ttft_p50_ms"], res[2]["ttft_p99_ms"] = 5.2, 9.75
    md = markdown_rows(res, [1, 32], "run").splitlines()
    row = next(l for l in md if "mxmoe_w4" in l)
    assert "| 0.90x |" in row and "| 0.28x |" in row and "| 120 | 900 |" in row
    assert "| 12% (short) |" in row and "| 5.2 / 9.8 |" in row        # largest spread; TTFT p50 / p99
    assert "| 5.0 |" in next(l for l in md if "gptq_w4" in l)          # no p50 recorded: the mean


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

    def __init__(self, short=False, delay=0.01):
        self.calls, self.short, self.delay = [], short, delay
        self.model_config = type("M", (), {"get_vocab_size": lambda self: 1000})()

    def get_tokenizer(self):
        return list(range(500))

    def generate(self, prompts, sp, use_tqdm=False):
        import time
        self.calls.append((len(prompts), sp.max_tokens, max(max(p["prompt_token_ids"]) for p in prompts)))
        time.sleep(self.delay if sp.max_tokens > 1 else 0.001 * len(self.calls) % 0.007)
        return [_Out(sp.max_tokens - (1 if self.short else 0)) for _ in prompts]


def _runner_args(*extra):
    from mxserve.vllm_plugin.bench_runner import parse_args
    return parse_args(["--model", "m", "--json", "x", "--batch-sizes", "1,4", "--output-len", "32", "--input-len", "8",
                       "--ttft-iters", "20", "--warmup", "1", "--min-window-s", "0.1", "--min-repeats", "3", *extra])


def test_runner_measure_windows_and_ttft_percentiles(vllm_cpu):
    import statistics

    from mxserve.vllm_plugin.bench_runner import measure, percentile
    a = _runner_args()
    llm = _FakeLLM()
    r = measure(llm, a)
    assert set(r["throughput"]) == {1, 4}
    for b in (1, 4):
        w = r["windows"][b]
        # repeats until the window is >= 0.1 s AND >= 3 repeats; the median repeat is reported, with its spread
        assert w["window_s"] >= 0.1 and len(w["repeats_tok_s"]) >= 3 and not w["short"]
        assert r["throughput"][b] == statistics.median(w["repeats_tok_s"])
        assert w["spread"] == pytest.approx((max(w["repeats_tok_s"]) - min(w["repeats_tok_s"])) / r["throughput"][b])
        assert max(w["repeats_tok_s"]) <= b * 32 / 0.01                  # each repeat took >= the fake's 10 ms
    # call 0: global warm-up; per batch size an untimed 4-token pass, then the timed repeats of 32 tokens
    seq = [c[:2] for c in llm.calls]
    n1 = len(r["windows"][1]["repeats_tok_s"])
    assert seq[1] == (1, 4) and seq[2:2 + n1] == [(1, 32)] * n1 and seq[2 + n1] == (4, 4)
    assert all(c[2] < 500 for c in llm.calls) and sum(1 for c in seq if c == (1, 1)) == 21
    assert r["ttft_n"] == 20 and r["ttft_p50_ms"] <= r["ttft_p99_ms"]
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5 and percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    with pytest.raises(RuntimeError, match="expected 32"):
        measure(_FakeLLM(short=True), a)


def test_runner_budget_cuts_repeats_and_flags_short_windows(vllm_cpu):
    import time

    from mxserve.vllm_plugin.bench_runner import measure
    a = _runner_args("--min-window-s", "30")
    r = measure(_FakeLLM(delay=0.02), a, deadline=time.perf_counter() + 0.5)  # far less than 2 x 30 s
    for b in (1, 4):
        assert r["windows"][b]["short"] and 1 <= len(r["windows"][b]["repeats_tok_s"]) < 50


def test_budget_derives_from_the_work():
    from mxserve.vllm_plugin.bench_runner import estimate_call_s, plan_budget_s
    small = plan_budget_s(4, [1, 8, 32], 128, 512)
    assert plan_budget_s(4, [1, 8, 32, 256], 128, 512) > small                # more batch sizes: more time
    assert plan_budget_s(48, [1, 8, 32], 128, 512) > 2 * small                 # more layers: more time
    assert plan_budget_s(4, [1, 8, 32], 128, 512, min_window_s=20) > small + 3 * 10
    # the 4-layer GPTQ-W4 B=8 window measured 1.1 s on the H200: the estimate must not be below it
    assert estimate_call_s(4, 8, 128, 512) >= 1.1


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
    geo = {"num_hidden_layers": 2, "num_experts": 4, "hidden_size": 256, "moe_intermediate_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(geo))
    a = types.SimpleNamespace(batch_sizes="1,8", input_len=8, output_len=16, engine_json="{}", variant_timeout=100)
    r = bench.bench_variant_engine("gptq_w4", str(tmp_path), a, str(tmp_path))
    mem = r.pop("expert_memory")
    assert r == {"variant": "gptq_w4", "throughput": {1: 10.0, 8: 70.0}, "ttft_ms": 12.5, "ttft_p50_ms": None,
                 "ttft_p99_ms": None, "startup_s": 40, "weight_gib": 2.38, "timeout_s": 100}
    assert mem["gpu_gib"] == mem["total_gib"] > 0 and mem["host_gib"] == 0
    cmd = (tmp_path / "gptq_w4-engine.log").read_text().splitlines()[0]
    assert "--quantization gptq_marlin" in cmd and "--budget-s 80" in cmd   # the runner fits inside the timeout


def test_merge_joins_calls_and_rejects_mismatched_runs(tmp_path):
    import json

    from mxserve.cli.bench import merge_results
    from mxserve.cli.main import build_parser
    base = {"preset": "p", "layers": 48, "input_len": 128, "output_len": 512, "runner": "engine", "wall_s": 500}
    a = {**base, "batch_sizes": [1, 32], "results": [
        {"variant": "gptq_w4", "throughput": {"1": 100.0, "32": 1000.0}, "windows": {"1": {"spread": 0.1}}},
        {"variant": "mxmoe_w4", "error": "timeout"}]}
    b = {**base, "batch_sizes": [1, 32], "results": [
        {"variant": "mxmoe_w4", "throughput": {"1": 110.0, "32": 990.0}},
        {"variant": "gptq_w4", "error": "skipped"}]}
    m = merge_results([json.loads(json.dumps(a)), json.loads(json.dumps(b))])
    assert [r["variant"] for r in m["results"]] == ["gptq_w4", "mxmoe_w4"]
    assert m["results"][0]["throughput"] == {1: 100.0, 32: 1000.0} and m["results"][0]["windows"][1]["spread"] == 0.1
    assert m["targets"]["mxmoe_w4_min_vs_gptq_w4"]["value"] == pytest.approx(0.99) and m["wall_s"] == 1000
    with pytest.raises(ValueError, match="'layers'"):
        merge_results([a, {**b, "layers": 4}])
    for i, r in enumerate((a, b)):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    args = build_parser("bench").parse_args(["bench", "merge", str(tmp_path / "0.json"), str(tmp_path / "1.json"),
                                             "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md")])
    assert args.func(args) == 0 and "| 0.99x |" in (tmp_path / "m.md").read_text()
    assert json.loads((tmp_path / "m.json").read_text())["merged_from"] == 2


def test_deadline_skips_variants_that_cannot_start(tmp_path, monkeypatch):
    import json

    from mxserve.cli import bench
    from mxserve.cli.main import build_parser
    monkeypatch.setattr(bench, "write_model_dirs", lambda p, l, o, vs: {v: str(tmp_path / v) for v in vs})
    seen = []

    def fake(v, d, a, logs):
        seen.append(a.variant_timeout)
        return {"variant": v, "throughput": {1: 1.0}}
    monkeypatch.setattr(bench, "bench_variant_engine", fake)
    args = build_parser("bench").parse_args(["bench", "e2e", "--out", str(tmp_path), "--json", str(tmp_path / "e.json"),
                                             "--layers", "4", "--variants", "bf16,fp8", "--batch-sizes", "1"])
    assert args.func(args) == 0 and seen[0] == pytest.approx(bench.variant_timeout(args))
    seen.clear()
    args.deadline_s = bench.estimate_startup_s(4) + 60                         # one variant fits, then 100 s gone
    ticks = iter([0.0, 0.0])                                                 # start, first variant; then +100 s
    monkeypatch.setattr(bench, "_clock", lambda: next(ticks, 100.0))
    assert args.func(args) == 1 and len(seen) == 1 and seen[0] <= args.deadline_s
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert "throughput" in res[0] and res[1]["error"].startswith("skipped")


def test_gptq_expert_bytes_match_vllm_create_weights(vllm_cpu):
    """``bench.expert_bytes(geo, "gptq_w4")`` (what ``--cpu-offload-gb`` is computed from) == the bytes of the
    parameters vLLM's GPTQ(-Marlin) MoE method creates (which its UVA offloader counts), for the bench's config."""
    from vllm.model_executor.layers.quantization.auto_gptq import (
        AutoGPTQConfig,
        AutoGPTQMoEMethod,
    )

    from mxserve.cli.bench import GPTQ_W4, expert_bytes
    method = object.__new__(AutoGPTQMoEMethod)          # create_weights reads only these attributes
    method.quant_config, method.input_dtype, method.experts_cls = AutoGPTQConfig.from_config(GPTQ_W4), None, None
    for E, H, I in ((4, 256, 128), (3, 2048, 768)):
        layer = torch.nn.Module()
        method.create_weights(layer, E, H, I, torch.bfloat16, intermediate_size_full=I, weight_loader=None)
        got = sum(p.numel() * p.element_size() for p in layer.parameters())
        assert expert_bytes({"layers": 1, "experts": E, "hidden": H, "inter": I}, "gptq_w4") == got


def test_dummy_load_reaches_the_offload_arena(vllm_cpu):
    """``--load-format dummy`` with the bench's offload plan: ``process_weights_after_loading`` fills the flat
    tensors with random codes and writes them into the host arena (no checkpoint), and the offloaded layers run."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoE

    from mxserve.cli.bench import mxmoe_plan
    from mxserve.config import MxMoEConfig
    from mxserve.scheduler.layout import BASE
    from mxserve.vllm_plugin.offload_method import OffloadMoEMethod
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    E, H, I, K, T = 8, 128, 128, 2, 5
    plan = mxmoe_plan("mxmoe_w4_off25", layers=2, experts=E)
    plan["experts"] = {f"model.layers.{900 + l}.mlp.experts": p for l, p in enumerate(plan["experts"].values())}
    plan["modules"] = {}
    qc = MxMoEQuantConfig(MxMoEConfig.from_dict(plan))
    fmt = vllm_cpu.load_config.load_format
    vllm_cpu.load_config.load_format = "dummy"
    try:
        with set_current_vllm_config(vllm_cpu):
            layers = [FusedMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, params_dtype=torch.float32,
                               quant_config=qc, prefix=p) for p in plan["experts"]]
            for m in layers:
                re_ = m.routed_experts
                assert type(re_.quant_method) is OffloadMoEMethod
                re_.quant_method.process_weights_after_loading(re_)      # no load_weights: dummy
    finally:
        vllm_cpu.load_config.load_format = fmt
    cache = qc.offload_runtime().cache
    qw = cache.arena.blob(1, E - 1, BASE)
    assert qw.float().std() > 30          # random bytes (uniform 0..255: std ~74), not an empty arena
    assert not torch.equal(cache.arena.blob(0, 0, BASE), cache.arena.blob(1, E - 1, BASE))
    g = torch.Generator().manual_seed(0)
    for l, m in enumerate(layers):
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
        y = m.routed_experts.quant_method.apply(m.routed_experts, torch.randn(T, H, generator=g),
                                                torch.rand(T, K, generator=g), ids, None, None)
        assert y.shape == (T, H) and torch.isfinite(y).all() and y.abs().sum() > 0
    assert cache.snapshot()["expert_cache_hits"] + cache.snapshot()["expert_cache_misses"] > 0
