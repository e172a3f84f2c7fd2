"""``mxserve bench e2e`` expert-offload plumbing on CPU (issue 7): the offload plans parse and validate, the expert
GiB arithmetic behind ``--cpu-offload-gb``, the runner's engine kwargs and offload-counter deltas, targets, the
deadline share, the merge of split calls and the markdown offload table. (The GPTQ byte count is checked against
vLLM's own ``create_weights`` in tests/contract/test_bench_e2e.py.)"""
from __future__ import annotations

import json
import types

import pytest

from mxserve.cli import bench
from mxserve.config import MxMoEConfig
from mxserve.scheduler.config import OffloadConfig
from mxserve_kernels.formats import WeightScheme

A3B = {"num_hidden_layers": 48, "num_experts": 128, "hidden_size": 2048, "moe_intermediate_size": 768,
       "intermediate_size": 6144}


@pytest.mark.parametrize("variant", list(bench.OFFLOAD_BUDGETS))
def test_offload_plans_parse_nested_with_their_budget(variant):
    cfg = MxMoEConfig.from_dict(bench.mxmoe_plan(variant, layers=3, experts=16))
    schemes = {s for p in cfg.experts.values() for s in (*p.gate_up, *p.down)}
    assert schemes == {WeightScheme(4, 128, nested=True)}           # nested W4: the offload method needs planes
    off = OffloadConfig.from_dict(cfg.offload)
    assert off.enabled and off.gpu_budget_fraction == bench.OFFLOAD_BUDGETS[variant] and off.on_miss == "base"
    assert off.prefetch and off.policy == "hebf"
    assert MxMoEConfig.from_dict(bench.mxmoe_plan("mxmoe_w4", 3, 16)).offload is None


def test_geometry_and_expert_bytes():
    geo = bench.geometry(A3B)
    assert geo == {"layers": 48, "experts": 128, "hidden": 2048, "inter": 768}
    n = 48 * 128 * 3 * 2048 * 768                                     # routed-expert weights of the model
    assert bench.expert_bytes(geo, "bf16") == 2 * n
    for name in ("int4_g128_asym", bench.NESTED_W4):
        s = WeightScheme.parse(name)
        assert bench.expert_bytes(geo, name) == pytest.approx(n * s.bits_per_weight / 8, rel=1e-9)
    # GPTQ W4 g128: 4 bits + bf16 scale and packed zero per group + int32 g_idx/sort per input row: 4.1-4.3 bits
    assert 4.1 < 8 * bench.expert_bytes(geo, "gptq_w4") / n < 4.3
    with pytest.raises(ValueError, match="num_experts"):
        bench.geometry({"num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 8})
    with pytest.raises(ValueError, match="mlp_only_layers"):
        bench.geometry({**A3B, "mlp_only_layers": [0]})


def test_offload_memory_same_gpu_bytes_for_the_vllm_peer():
    from mxserve.scheduler.layout import PlaneLayout
    geo = bench.geometry(A3B)
    s = WeightScheme.parse(bench.NESTED_W4)
    slot = PlaneLayout(hidden=2048, inter=768, gate_up=s, down=s).slot_bytes
    for v, frac in bench.OFFLOAD_BUDGETS.items():
        m = bench.expert_memory(geo, v)
        # the arena holds every plane (aligned: >= the scheme's bytes); the pool is the share, rounded to slots
        assert m["host_gib"] * bench.GIB >= bench.expert_bytes(geo, bench.NESTED_W4)
        assert frac * m["host_gib"] * bench.GIB - slot < m["gpu_gib"] * bench.GIB <= frac * m["host_gib"] * bench.GIB
    off25 = bench.expert_memory(geo, "mxmoe_w4_off25")
    for peer in bench.VLLM_OFFLOAD:
        m = bench.expert_memory(geo, peer)
        assert m["gpu_gib"] == off25["gpu_gib"]                       # same GPU bytes for expert weights
        assert m["gpu_gib"] + m["host_gib"] == pytest.approx(m["total_gib"])
        assert m["cpu_offload_gb"] == pytest.approx(m["host_gib"], abs=1e-3)
    g = bench.expert_memory(geo, "gptq_w4_cpuoff25")
    assert 0.25 < g["gpu_gib"] / g["total_gib"] < 0.3               # 4.5-bit pool vs 4.2-bit GPTQ: a bit over 25%
    kw = bench.vllm_offload_kwargs(geo, "gptq_w4_cpuoff25")
    assert kw == {"cpu_offload_gb": g["cpu_offload_gb"], "cpu_offload_params": ["experts"]}
    assert bench.vllm_offload_kwargs(geo, "mxmoe_w4_off25") == {}
    assert json.loads(bench.engine_json("gptq_w4_cpuoff25", '{"enforce_eager": true, "cpu_offload_gb": 1}', geo)) \
        == {"enforce_eager": True, **kw}                              # the peer's budget wins over a stray value
    with pytest.raises(ValueError, match="--engine-json"):
        bench.engine_json("gptq_w4", "[1]", geo)


def test_model_dirs_share_the_peer_directories(tmp_path, monkeypatch):
    """bf16_cpuoff25 runs on the plain directory, gptq_w4_cpuoff25 on GPTQ's; each offload budget gets its own."""
    from mxserve.models import corpus, tokenizer
    monkeypatch.setattr(corpus, "read_corpus", lambda max_bytes: ("hello world " * 50, None))
    monkeypatch.setattr(tokenizer, "train_tokenizer", lambda text, n, d: (tmp_path / "bf16" / "tokenizer.json").write_text("{}"))
    vs = ["bf16_cpuoff25", "gptq_w4_cpuoff25", "mxmoe_w4_off25", "mxmoe_w4_off50"]
    dirs = bench.write_model_dirs("qwen3-30b-a3b", 2, str(tmp_path), vs)
    assert dirs["bf16_cpuoff25"] == str(tmp_path / "bf16") and dirs["gptq_w4_cpuoff25"] == str(tmp_path / "gptq_w4")
    c = {v: json.loads((tmp_path / dirs[v] / "config.json").read_text()) for v in vs}
    assert "quantization_config" not in c["bf16_cpuoff25"]
    assert c["gptq_w4_cpuoff25"]["quantization_config"]["quant_method"] == "gptq"
    assert c["mxmoe_w4_off25"]["quantization_config"]["offload"]["gpu_budget_fraction"] == 0.25
    assert c["mxmoe_w4_off50"]["quantization_config"]["offload"]["gpu_budget_fraction"] == 0.5
    assert (tmp_path / "gptq_w4" / "tokenizer.json").exists()


def _runner_args(*extra):
    from mxserve.vllm_plugin.bench_runner import parse_args
    return parse_args(["--model", "m", "--json", "x", "--batch-sizes", "1,32", "--input-len", "128",
                       "--output-len", "128", *extra])


def test_runner_engine_kwargs():
    from mxserve.vllm_plugin import bench_runner as br
    kw = br.engine_kwargs(_runner_args())
    assert kw["max_model_len"] == 128 + 128 + 64 and kw["max_num_seqs"] == 32 and "worker_extension_cls" not in kw
    kw = br.engine_kwargs(_runner_args("--ttft-input-len", "2048", "--offload-stats", "--engine-json",
                                       '{"cpu_offload_gb": 10.3, "cpu_offload_params": ["experts"]}'))
    assert kw["max_model_len"] == 2048 + 1 + 64                      # the 2k TTFT prompt fits
    assert kw["cpu_offload_params"] == {"experts"} and kw["cpu_offload_gb"] == 10.3   # EngineArgs wants a set
    mod, cls = kw["worker_extension_cls"].rsplit(".", 1)
    import importlib
    ext = getattr(importlib.import_module(mod), cls)
    assert ext is br.OffloadStatsExtension and callable(ext.mxserve_offload_stats)
    assert br._plain({"s": {"b", "a"}, "t": (1, 2)}) == {"s": ["a", "b"], "t": [1, 2]}
    with pytest.raises(ValueError, match="--engine-json"):
        br.engine_kwargs(_runner_args("--engine-json", "[]"))


class _Cache:
    def __init__(self):
        self.arena = types.SimpleNamespace(pin_mode="register", pinned_bytes=4096)

    def stats(self):
        import numpy as np
        return {"hits": np.int64(5), "misses": 3, "bytes_moved": 10, "plane_mix": {"int2": np.int64(1)}}


def test_offload_stats_finds_the_runtime_cache():
    import torch

    from mxserve.vllm_plugin.bench_runner import OffloadStatsExtension, offload_stats
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Identity()))
    assert offload_stats(model) is None
    model[1][0].quant_method = types.SimpleNamespace(runtime=types.SimpleNamespace(cache=_Cache()))
    s = offload_stats(model)
    assert s == {"hits": 5, "misses": 3, "bytes_moved": 10, "plane_mix": {"int2": 1}, "pin_mode": "register",
                 "host_pinned_bytes": 4096}
    assert type(s["hits"]) is int and json.dumps(s)
    worker = type("W", (OffloadStatsExtension,), {"get_model": lambda self: model})()
    assert worker.mxserve_offload_stats() == s


def test_stats_delta():
    from mxserve.vllm_plugin.bench_runner import stats_delta
    a = {"hits": 10, "misses": 5, "bytes_moved": 1000, "stall_seconds": 0.5, "degraded": 1,
         "plane_mix": {"int2": 4, "int4": 10}, "prefetch_issued": 3, "prefetch_useful": 1, "prefetch_bytes": 100}
    b = {"hits": 40, "misses": 15, "bytes_moved": 5_000_001_000, "stall_seconds": 1.5, "degraded": 4,
         "plane_mix": {"int2": 9, "int3": 2, "int4": 30}, "prefetch_issued": 8, "prefetch_useful": 5,
         "prefetch_bytes": 300}
    d = stats_delta(a, b, seconds=4.0)
    assert d["hits"] == 30 and d["misses"] == 10 and d["hit_rate"] == pytest.approx(0.75)
    assert d["h2d_bytes"] == 5_000_000_000 and d["h2d_gbps"] == pytest.approx(1.25)
    assert d["stall_s"] == pytest.approx(1.0) and d["stall_fraction"] == pytest.approx(0.25)
    assert d["plane_mix"] == {"int2": 5, "int3": 2, "int4": 20} and d["degraded"] == 3 and d["prefetch_useful"] == 4
    assert stats_delta(None, b, 1.0) is None and stats_delta(a, a, 1.0)["hit_rate"] is None


class _Out:
    def __init__(self, n):
        self.outputs = [type("C", (), {"token_ids": list(range(n))})()]


class _FakeLLM:
    def __init__(self):
        self.model_config = type("M", (), {"get_vocab_size": lambda self: 1000})()
        self.prompt_lens, self.counter = [], 0

    def get_tokenizer(self):
        return list(range(500))

    def generate(self, prompts, sp, use_tqdm=False):
        import time
        time.sleep(0.002)
        self.prompt_lens.append(len(prompts[0]["prompt_token_ids"]))
        self.counter += len(prompts)          # "expert cache" moves one hit per prompt per call
        return [_Out(sp.max_tokens) for _ in prompts]


def test_measure_reads_counters_around_windows_and_ttft_prompt_len():
    from mxserve.vllm_plugin.bench_runner import measure, parse_args
    a = parse_args(["--model", "m", "--json", "x", "--batch-sizes", "1,4", "--input-len", "8", "--output-len", "4",
                    "--ttft-input-len", "64", "--ttft-iters", "5", "--warmup", "2", "--min-window-s", "0.01",
                    "--min-repeats", "2"])
    llm = _FakeLLM()
    reads = []

    def stats():
        reads.append(llm.counter)
        return {"hits": llm.counter, "misses": 0, "bytes_moved": 0, "stall_seconds": 0.0, "plane_mix": {}}
    r = measure(llm, a, stats=stats)
    for b in (1, 4):                        # only the timed repeats count: b hits per repeat
        assert r["offload"][b]["hits"] == b * len(r["windows"][b]["repeats_tok_s"])
    assert r["offload_ttft"]["hits"] == 5 and r["ttft_input_len"] == 64 and llm.prompt_lens[-5:] == [64] * 5
    assert r["prefill_tok_s"] == pytest.approx(64 / (r["ttft_p50_ms"] / 1000))
    assert measure(_FakeLLM(), a).get("offload") is None     # no stats callable: no offload fields


def test_offload_targets_and_table():
    res = [{"variant": "mxmoe_w4", "throughput": {1: 100.0, 32: 2000.0}},
           {"variant": "mxmoe_w4_off25", "throughput": {1: 60.0, 32: 1100.0}, "prefill_tok_s": 9000.0,
            "expert_memory": {"gpu_gib": 3.8, "host_gib": 15.2, "total_gib": 15.2},
            "offload": {32: {"stall_fraction": 0.2, "h2d_gbps": 25.0, "hit_rate": 0.6}}},
           {"variant": "gptq_w4_cpuoff25", "throughput": {1: 40.0, 32: 400.0},
            "expert_memory": {"gpu_gib": 3.8, "host_gib": 10.3, "total_gib": 14.1}}]
    t = bench.targets(res, [1, 32])
    assert t["mxmoe_w4_off25_vs_resident_b32"] == {"value": pytest.approx(0.55), "target": 0.5, "ok": True}
    assert t["mxmoe_w4_off25_vs_vllm_cpuoff25_b32"]["value"] == pytest.approx(2.75)
    assert not t["mxmoe_w4_off25_vs_vllm_cpuoff25_b32"]["ok"]
    assert "mxmoe_w4_off25_vs_resident_b32" not in bench.targets(res[1:], [1, 32])
    md = bench.offload_rows(res, [1, 32], pinned_gbps=50.0)
    row = next(l for l in md.splitlines() if "| mxmoe_w4_off25 |" in l)
    assert "| 3.80 / 15.20 | - | 20% / 25.0 (0.50x) / 0.60 | 9,000 |" in row and "pinned H2D copy: 50.0" in md
    assert "| gptq_w4_cpuoff25 | 3.80 / 10.30 | - | - | - |" in md and "| mxmoe_w4 |" not in md
    assert bench.offload_rows(res[:1], [1, 32], None) == ""


def test_share_timeout_reserves_the_next_variants_minimum():
    assert bench.share_timeout(300.0, None, 100.0, 3) == 300.0
    assert bench.share_timeout(500.0, 525.0, 171.0, 1) == 525.0 - 171.0     # the second variant keeps its minimum
    assert bench.share_timeout(200.0, 525.0, 171.0, 1) == 200.0             # planned work is less: planned
    assert bench.share_timeout(500.0, 300.0, 171.0, 1) == 300.0             # both cannot fit: the first takes all


def test_pinned_measurement_parses_and_reports_errors(monkeypatch):
    import subprocess
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return types.SimpleNamespace(returncode=0, stdout="noise\nPINNED 52.5\n", stderr="")
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert bench.measure_pinned_gbps(1.0) == {"pinned_gbps": 52.5, "pinned_gib": 1.0}
    assert "pinned_bandwidth(int(1.0 * (1 << 30)))" in calls[0][-1]
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: types.SimpleNamespace(returncode=1, stdout="",
                                                                                     stderr="no CUDA"))
    assert "no CUDA" in bench.measure_pinned_gbps(1.0)["pinned_error"]


def test_e2e_run_measures_pinned_first_and_merges_offload_calls(tmp_path, monkeypatch):
    from mxserve.cli.main import build_parser
    monkeypatch.setattr(bench, "write_model_dirs", lambda p, l, o, vs: {v: str(tmp_path / v) for v in vs})
    order = []
    monkeypatch.setattr(bench, "measure_pinned_gbps", lambda gib: order.append("pinned") or {"pinned_gbps": 50.0})

    def fake(v, d, a, logs):
        order.append(v)
        tput = {"mxmoe_w4": 2000.0, "mxmoe_w4_off25": 1200.0, "gptq_w4_cpuoff25": 300.0}[v]
        return {"variant": v, "throughput": {32: tput},
                **({"offload": {32: {"stall_fraction": 0.1, "h2d_gbps": 10.0, "hit_rate": 0.5}}} if "off25" in v
                   and v.startswith("mx") else {})}
    monkeypatch.setattr(bench, "bench_variant_engine", fake)
    outs = []
    for i, vs in enumerate(("mxmoe_w4,mxmoe_w4_off25", "gptq_w4_cpuoff25")):
        args = build_parser("bench").parse_args(
            ["bench", "e2e", "--out", str(tmp_path), "--json", str(tmp_path / f"e{i}.json"), "--layers", "4",
             "--variants", vs, "--batch-sizes", "32", "--ttft-input-len", "2048"])
        assert args.func(args) == 0
        outs.append(json.loads((tmp_path / f"e{i}.json").read_text()))
    assert order == ["pinned", "mxmoe_w4", "mxmoe_w4_off25", "pinned", "gptq_w4_cpuoff25"]
    assert outs[0]["pinned_gbps"] == 50.0 and outs[0]["ttft_input_len"] == 2048
    assert outs[0]["targets"]["mxmoe_w4_off25_vs_resident_b32"]["value"] == pytest.approx(0.6)
    m = bench.merge_results(outs)
    assert m["results"][1]["offload"][32]["h2d_gbps"] == 10.0 and m["pinned_gbps"] == 50.0
    assert m["targets"]["mxmoe_w4_off25_vs_vllm_cpuoff25_b32"] == {"value": pytest.approx(4.0), "target": 3.0,
                                                                   "ok": True}
    with pytest.raises(ValueError, match="ttft_input_len"):
        bench.merge_results([outs[0], {**outs[1], "ttft_input_len": 128}])
    args = build_parser("bench").parse_args(["bench", "e2e", "--out", str(tmp_path), "--json", "x.json",
                                             "--variants", "mxmoe_w4_off25", "--runner", "vllm-bench"])
    with pytest.raises(ValueError, match="--runner engine"):
        args.func(args)


def test_stats_reader_uses_worker_rpc_and_survives_a_failure(capsys):
    from mxserve.vllm_plugin.bench_runner import _stats_reader
    calls = []

    class LLM:
        def __init__(self, fail):
            self.fail = fail

        def collective_rpc(self, method):
            calls.append(method)
            if self.fail:
                raise RuntimeError("no such method")
            return [{"hits": 1}, {"hits": 2}]
    assert _stats_reader(LLM(False))() == {"hits": 1} and calls == ["mxserve_offload_stats"]
    read = _stats_reader(LLM(True))
    assert read() is None and read() is None and len(calls) == 2      # one failed call, then no more RPCs
    assert "offload counters unavailable" in capsys.readouterr().out
