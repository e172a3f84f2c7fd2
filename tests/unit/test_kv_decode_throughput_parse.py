"""The parser of ``.ci/gpu/kv_throughput.sh`` on log excerpts built from vLLM 0.26's own format strings
(``benchmarks/throughput.py`` "Throughput: ..." / "Total num ..." prints, ``v1/core/kv_cache_utils.py``
"GPU KV cache size: %s tokens" with ``f"{num_tokens:,}"``), including failed, timed-out and missing variants."""
from __future__ import annotations

import json

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
