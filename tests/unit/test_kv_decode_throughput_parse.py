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
