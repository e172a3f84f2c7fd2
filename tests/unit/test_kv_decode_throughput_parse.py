"""The parser of ``.ci/gpu/kv_throughput.sh`` on log excerpts built from vLLM 0.26's own format strings
(``benchmarks/throughput.py`` "Throughput: ..." / "Total num ..." prints, ``v1/core/kv_cache_utils.py``
"GPU KV cache size: %s tokens" with ``f"{num_tokens:,}"``), including failed, timed-out and missing variants."""
from __future__ import annotations

import json

import pytest

from mxserve_kernels.bench import kv_throughput_parse as P


def _log(req_s: float, tot: float, out: float, kv_tokens: int, prompt: int = 524288, gen: int = 16384) -> str:
    """A bench log as vLLM 0.26 prints it (engine-core logger prefix, then the bench's prints)."""
    return "\n".join([
        "INFO 11-23 10:00:01 [__init__.py:239] Automatically detected platform cuda.",
        f"(EngineCore_DP0 pid=4242) INFO 11-23 10:00:40 [kv_cache_utils.py:2177] GPU KV cache size: "
        f"{kv_tokens:,} tokens",
        "(EngineCore_DP0 pid=4242) INFO 11-23 10:00:40 [kv_cache_utils.py:2179] Maximum concurrency for 8,448 "
        "tokens per request: 12.34x",
        "Processed prompts: 100%|##########| 64/64 [00:30<00:00,  2.10it/s]",
        f"Throughput: {req_s:.2f} requests/s, {tot:.2f} total tokens/s, {out:.2f} output tokens/s",
        f"Total num prompt tokens:  {prompt}",
        f"Total num output tokens:  {gen}",
    ])


def test_parse_log_fields():
    got = P.parse_log(_log(2.1, 17745.32, 537.6, 51990192))
    assert got == {"requests_s": 2.1, "total_tok_s": 17745.32, "output_tok_s": 537.6, "kv_cache_tokens": 51990192,
                   "max_concurrency": 12.34, "prompt_tokens": 524288, "output_tokens": 16384}
    assert P.parse_log("Traceback (most recent call last):\nRuntimeError: boom") == {}


def test_build_statuses_ratios_and_atomic_json(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    runs = {"auto": (0, _log(1.0, 9000.0, 400.0, 7108032)),
            "int4_per_token_head": (0, _log(1.0, 9000.0, 320.0, 28432128)),
            "mxmoe-K2V1.5": (0, _log(1.0, 9000.0, 500.0, 51990192)),
            "fp8": (1, "ValueError: fp8 KV cache is not supported here"),
            "mxmoe-K4V4": (124, "(EngineCore_DP0 pid=1) INFO loading weights")}
    for name, (rc, text) in runs.items():
        (logs / f"{name}.log").write_text(text)
        (logs / f"{name}.rc").write_text(f"{rc}\n")
    names = [*runs, "never"]
    out = tmp_path / "res" / "kv_throughput.json"
    P.main(["--logs", str(logs), "--variants", ",".join(names), "--json", str(out), "--meta", '{"num_prompts": 64}'])
    res = json.loads(out.read_text())
    v = res["variants"]
    assert [v[n]["status"] for n in names] == ["ok", "ok", "ok", "failed", "timeout", "not_run"]
    assert "fp8 KV cache is not supported" in v["fp8"]["log_tail"] and "log_tail" not in v["auto"]
    r = res["ratios"]["mxmoe-K2V1.5"]
    assert r["output_tok_s_vs_auto"] == round(500.0 / 400.0, 3)
    assert r["output_tok_s_vs_int4_per_token_head"] == round(500.0 / 320.0, 3)
    assert r["kv_tokens_vs_auto"] == round(51990192 / 7108032, 3)
    assert "mxmoe-K4V4" not in res["ratios"]  # timed out: no ratio
    assert res["meta"] == {"num_prompts": 64}
    assert not (tmp_path / "res" / "kv_throughput.json.tmp").exists()


def test_zero_exit_without_throughput_line_is_a_failure(tmp_path):
    (tmp_path / "x.log").write_text("GPU KV cache size: 1,000 tokens\n")
    (tmp_path / "x.rc").write_text("0")
    e = P.variant_entry(str(tmp_path / "x.log"), str(tmp_path / "x.rc"))
    assert e["status"] == "failed" and e["kv_cache_tokens"] == 1000 and "log_tail" in e


def _dead_engine_log() -> str:
    """An engine that died in prefill as vLLM 0.26 prints it: the engine core's logger.exception block (process
    prefix on every line, level/date prefix on the first), then the client's EngineDeadError traceback."""
    core = "(EngineCore pid=1363) "
    return "\n".join([
        f"{core}INFO 11-22 13:32:15 [kv_cache_utils.py:2177] GPU KV cache size: 114,210,608 tokens",
        f"{core}WARNING 11-22 13:32:16 [utils.py:10] some benign warning",
        f"{core}ERROR 11-22 13:32:31 [core.py:1100] EngineCore encountered a fatal error.",
        f"{core}Traceback (most recent call last):",
        f'{core}  File "/tmp/gpusite/vllm/v1/engine/core.py", line 1091, in run_engine_core',
        f"{core}    engine_core.run_busy_loop()",
        f'{core}  File "/work/mxserve_kernels/attention/prefill.py", line 60, in paged_prefill_attention',
        f"{core}    o = F.scaled_dot_product_attention(",
        f"{core}torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has a total "
        "capacity of 139.81 GiB of which 5.12 GiB is free.",
        "Rendering prompts:  16%|#5        | 10/64 [00:00<00:05, 10.13it/s]",
        "Traceback (most recent call last):",
        '  File "/tmp/gpusite/vllm/v1/engine/core_client.py", line 672, in ensure_alive',
        "    raise EngineDeadError()",
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for "
        "the root cause.",
        "kv_throughput: rc=1",
    ])


def test_dead_engine_keeps_engine_core_first_error_and_rc_trailer(tmp_path):
    (tmp_path / "mxmoe-K2V1.5.log").write_text(_dead_engine_log())  # no .rc file: the trailer carries it
    e = P.variant_entry(str(tmp_path / "mxmoe-K2V1.5.log"), str(tmp_path / "mxmoe-K2V1.5.rc"))
    assert e["status"] == "failed" and e["rc"] == 1 and e["kv_cache_tokens"] == 114210608
    assert e["root_cause"].startswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB")
    block = e["first_error"].splitlines()
    assert "Traceback (most recent call last):" in block and "EngineCore encountered a fatal error." in block
    assert any(x.startswith('  File "/work/mxserve_kernels/attention/prefill.py"') for x in block)  # prefix gone
    assert "kv_throughput: rc=1" not in e["log_tail"] and "EngineDeadError" in e["log_tail"]


def test_first_error_falls_back_to_client_traceback_and_error_lines():
    client_only = "\n".join(_dead_engine_log().splitlines()[10:])
    got = P.first_error(client_only)
    assert got["root_cause"].startswith("vllm.v1.engine.exceptions.EngineDeadError:")
    got = P.first_error("INFO loading\nValueError: max_model_len is greater than the sum\nmore")
    assert got["root_cause"].startswith("ValueError: max_model_len") and got["first_error"].endswith("more")
    assert P.first_error("INFO all fine\nThroughput: 1.00 requests/s") == {}


def test_trailer_wins_over_stale_rc_file(tmp_path):
    (tmp_path / "x.log").write_text(_log(1.0, 9000.0, 400.0, 1000) + "\nkv_throughput: rc=0\n")
    (tmp_path / "x.rc").write_text("1")
    assert P.variant_entry(str(tmp_path / "x.log"), str(tmp_path / "x.rc"))["status"] == "ok"


_INIT = ("(EngineCore pid=2046) INFO 11-22 14:43:27 [core.py:340] init engine (profile, create kv cache, warmup model) "
         "took 55.00 s (compilation: 15.85 s)")


def _timed_out(after_init: list[str], start: str = "11-22 14:41:57", end: str = "11-22 14:43:47") -> str:
    """A bench log cut by ``timeout`` (rc 124) with the script's clock trailer, as session 6's K2V1.5 run."""
    return "\n".join([
        "INFO 11-22 14:41:59 [utils.py:90] Sampling input_len from [8192, 8192] and output_len from [256, 256]",
        "(EngineCore pid=2046) INFO 11-22 14:43:08 [kv_cache_utils.py:2177] GPU KV cache size: 114,210,608 tokens",
        "(EngineCore pid=2046) Capturing CUDA graphs (decode, FULL):  96%|#########6| 49/51 [00:06<00:00,  4.06it/s]"
        "\rCapturing CUDA graphs (decode, FULL): 100%|##########| 51/51 [00:06<00:00,  7.34it/s]",
        _INIT, *after_init,
        "/usr/lib/python3.12/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: leaked",
        f"kv_throughput: start={start} end={end}", "kv_throughput: rc=124"])


def test_timeout_after_init_without_progress_says_when(tmp_path):
    (tmp_path / "k.log").write_text(_timed_out([]))
    e = P.variant_entry(str(tmp_path / "k.log"), str(tmp_path / "k.rc"))
    assert e["status"] == "timeout" and e["timeout_phase"] == "after_init" and e["clock"] == "process start"
    assert (e["init_s"], e["init_done_at_s"], e["ended_at_s"]) == (55.0, 90.0, 110.0)
    assert e["timeout_detail"].startswith("timeout after engine init at 90 s (killed at 110 s, 20 s after init)")
    assert "prompts not rendered yet" in e["timeout_detail"] and "last_progress" not in e  # graph bars were before


def test_timeout_after_init_reports_last_bar_and_stats(tmp_path):
    bars = ("Rendering prompts: 100%|##########| 64/64 [00:00<00:00, 80.68it/s]\rProcessed prompts:   0%|          "
            "| 0/64 [00:00<?, ?it/s, est. speed input: 0.00 toks/s, output: 0.00 toks/s]")
    stats = ("INFO 11-22 14:43:40 [loggers.py:310] Engine 000: Avg prompt throughput: 16384.0 tokens/s, Avg generation "
             "throughput: 3.2 tokens/s, Running: 4 reqs, Waiting: 60 reqs, GPU KV cache usage: 0.1%")
    (tmp_path / "k.log").write_text(_timed_out([bars, stats, "Processed prompts:   2%|2         | 1/64 [00:12<10:43,"
                                                " 10.21s/it, est. speed input: 1.00 toks/s, output: 0.10 toks/s]"]))
    e = P.variant_entry(str(tmp_path / "k.log"), str(tmp_path / "k.rc"))
    assert e["last_progress"].startswith("Processed prompts:   2%") and e["last_progress"].endswith("0.10 toks/s]")
    assert e["last_stats"].startswith("Engine 000: Avg prompt throughput: 16384.0") and "Waiting: 60" in e["last_stats"]
    assert "last progress: Processed prompts:   2%" in e["timeout_detail"] and "last stats: Engine 000" in e["timeout_detail"]


def test_timeout_phases_before_init_and_first_line_clock(tmp_path):
    log = _timed_out([]).replace(_INIT + "\n", "")
    (tmp_path / "a.log").write_text(log)
    e = P.variant_entry(str(tmp_path / "a.log"), "")
    assert e["timeout_phase"] == "engine_init" and "init_s" not in e
    assert e["timeout_detail"].endswith("Capturing CUDA graphs (decode, FULL): 100%|##########| 51/51 [00:06<00:00,  "
                                        "7.34it/s]")
    (tmp_path / "b.log").write_text("INFO 11-22 14:00:00 [utils.py:90] Sampling\nkv_throughput: rc=124\n")
    assert P.variant_entry(str(tmp_path / "b.log"), "")["timeout_phase"] == "startup"
    no_clock = "\n".join(x for x in _timed_out([]).splitlines() if "start=" not in x)  # a session-5/6 log
    (tmp_path / "c.log").write_text(no_clock)
    e = P.variant_entry(str(tmp_path / "c.log"), "")
    assert e["clock"] == "first log line" and e["init_done_at_s"] == 88.0 and "ended_at_s" not in e
    assert "at 88 s after the first log line" in e["timeout_detail"]


def test_ok_and_failed_runs_carry_no_timeout_fields(tmp_path):
    (tmp_path / "x.log").write_text(_INIT + "\n" + _log(1.0, 9000.0, 400.0, 1000) + "\nkv_throughput: rc=0\n")
    e = P.variant_entry(str(tmp_path / "x.log"), "")
    assert e["status"] == "ok" and e["init_s"] == 55.0 and not any(k.startswith("timeout") for k in e)


def test_merge_joins_calls_and_recomputes_ratios(tmp_path):
    one = {"meta": {"call": 1}, "variants": {"auto": {"status": "ok", "output_tok_s": 400.0, "kv_cache_tokens": 10},
                                             "mxmoe-K2V1.5": {"status": "timeout"}}, "ratios": {}}
    two = {"meta": {"call": 2}, "variants": {"mxmoe-K2V1.5": {"status": "ok", "output_tok_s": 500.0,
                                                              "kv_cache_tokens": 73}}, "ratios": {}}
    paths = []
    for i, obj in enumerate((one, two)):
        paths.append(str(tmp_path / f"{i}.json"))
        (tmp_path / f"{i}.json").write_text(json.dumps(obj))
    out = tmp_path / "m.json"
    P.main(["--merge", *paths, "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["meta"] == {"merged": [{"call": 1}, {"call": 2}]}
    assert res["ratios"]["mxmoe-K2V1.5"] == {"output_tok_s_vs_auto": 1.25, "kv_tokens_vs_auto": 7.3}
    with pytest.raises(ValueError, match="variants"):
        P.merge([{"meta": {}}])
