"""GPU: expert offloading served by ``vllm serve`` (default compilation: torch.compile + CUDA graphs; the offload
quant config makes the MoE op a splitting op with PIECEWISE graphs). A tiny random Qwen3-MoE (6 MoE layers x 8
experts) quantized nested (``mxserve quantize --nested``: int2 base + planes, RTN, uniform nested4) is served twice,
one server after the other: all experts resident (no ``offload`` section) and offloaded with
``gpu_budget_fraction=0.25`` (``on_miss="wait"``: every expert runs at its full prefix, so outputs must agree).
Checks: greedy tokens agree >= OFFLOAD_GREEDY_AGREE_MIN, mean prompt-logprob KLD <= OFFLOAD_KLD_MAX, and the
``mxserve:expert_*`` counters on /metrics move (misses and H2D bytes > 0: the budget forces transfers).
Run: ``MXSERVE_TEST_JSON=$OUT/offload_vllm.json pytest -q -m gpu tests/integration/test_offload_vllm.py``
(server logs under ``$MXSERVE_TEST_LOG_DIR`` when set).
"""
from __future__ import annotations

import json
import os
import re

import pytest

from tests.helpers.logprobs import mean_prompt_kld
from tests.helpers.results import record_result
from tests.tolerances import OFFLOAD_GREEDY_AGREE_MIN, OFFLOAD_KLD_MAX

pytestmark = pytest.mark.gpu

GEOM = {"layers": 6, "experts": 8, "top_k": 2, "hidden": 256, "inter": 128, "vocab": 1024, "heads": 4,
        "kv_heads": 2, "head_dim": 64}
OFFLOAD = {"version": 1, "gpu_budget_fraction": 0.25, "on_miss": "wait", "lookahead": 1, "policy": "hebf"}
SERVER_ARGS = ["-q", "mxmoe", "--max-model-len", "512", "--gpu-memory-utilization", "0.15", "--max-num-seqs", "16",
               "--max-logprobs", "-1", "--seed", "0"]
PROMPTS = ["def main(", "import os\n", "class Foo:\n    def ", "for i in range(", "return self.", "x = [",
           "if __name__ == ", "with open("]
GEN_TOKENS = 32
SAMPLE = re.compile(r'^(mxserve:expert_[a-z_]+)(\{[^}]*\})? (\S+)$', re.MULTILINE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{"resident": nested checkpoint, "offload": the same files with ``quantization_config.offload`` set}."""
    from mxserve.models.tiny import make_tiny
    from mxserve.quant.api import quantize_checkpoint
    root = tmp_path_factory.mktemp("offload_ckpt")
    src = make_tiny("qwen3_moe", root / "src", seed=1, **GEOM)
    res = root / "resident"
    quantize_checkpoint(str(src), str(res), bits=4.5, calib=None, method="rtn", nested=True, uniform=True,
                        group_size=128, progress=False)
    off = root / "offload"
    off.mkdir()
    for name in os.listdir(res):
        if name != "config.json":
            os.symlink(res / name, off / name)
    with open(res / "config.json") as f:
        cfg = json.load(f)
    assert {s for p in cfg["quantization_config"]["experts"].values() for s in p["gate_up"] + p["down"]} == {
        "int2_g128_asym_nested4"}
    cfg["quantization_config"]["offload"] = OFFLOAD
    with open(off / "config.json.tmp", "w") as f:
        json.dump(cfg, f, indent=1)
    os.replace(off / "config.json.tmp", off / "config.json")
    return {"resident": str(res), "offload": str(off)}


def _client(srv):
    import openai
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=300)


def _expert_metrics(url: str) -> dict[str, float]:
    import httpx
    out: dict[str, float] = {}
    for name, _, v in SAMPLE.findall(httpx.get(url + "/metrics", timeout=10).text):
        out[name] = out.get(name, 0.0) + float(v)
    return out


def _serve(ckpt: str, label: str, prompt_ids) -> dict:
    """Greedy tokens, full-vocab prompt logprobs and expert-cache metrics of one server run."""
    import time

    from mxserve.vllm_plugin.server import VllmServer
    logs = os.environ.get("MXSERVE_TEST_LOG_DIR") or os.path.join(os.path.dirname(ckpt), "logs")
    os.makedirs(logs, exist_ok=True)
    with VllmServer(ckpt, SERVER_ARGS, log_dir=logs, label=label, env={"PROMETHEUS_MULTIPROC_DIR": None}) as srv:
        before = _expert_metrics(srv.url)
        r = _client(srv).completions.create(model="m", prompt=prompt_ids, max_tokens=GEN_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
        toks = {c.index: c.model_extra["token_ids"] for c in r.choices}
        lps = []
        for ids in prompt_ids:
            pr = _client(srv).completions.create(model="m", prompt=ids, max_tokens=1, temperature=0,
                                                 extra_body={"prompt_logprobs": -1})
            pl = pr.choices[0].model_extra["prompt_logprobs"]
            lps.append([{int(k): v["logprob"] for k, v in pos.items()} for pos in pl[1:]])
        time.sleep(2.5)          # the cache publishes its snapshot at most once a second
        after = _expert_metrics(srv.url)
    return {"tokens": [toks[i] for i in range(len(prompt_ids))], "logprobs": lps, "before": before, "after": after}


@pytest.fixture(scope="module")
def runs(checkpoints):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(checkpoints["resident"])
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return {name: _serve(path, f"offload-{name}", ids) for name, path in checkpoints.items()}


def test_offloaded_outputs_agree_with_resident(runs):
    a, b = runs["resident"]["tokens"], runs["offload"]["tokens"]
    agree = sum(int(x == y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    total = sum(len(t) for t in a)
    kld, n = mean_prompt_kld(runs["resident"]["logprobs"], runs["offload"]["logprobs"])
    record_result("offload_vllm", {"greedy_agreement": agree / total, "tokens": total, "prompt_kld": kld,
                                   "kld_positions": n, "offload": OFFLOAD, "geometry": GEOM})
    assert agree / total >= OFFLOAD_GREEDY_AGREE_MIN, f"greedy agreement {agree}/{total}"
    assert kld <= OFFLOAD_KLD_MAX, f"mean KLD(resident || offload) = {kld:.2e} over {n} positions"


def test_offload_metrics_move(runs):
    before, after = runs["offload"]["before"], runs["offload"]["after"]
    record_result("offload_vllm_metrics", {"before": before, "after": after})
    assert "mxserve:expert_cache_hits_total" in after, sorted(after)
    moved = {k for k in after if after[k] != before.get(k, 0.0)}
    assert {"mxserve:expert_cache_misses_total", "mxserve:expert_h2d_bytes_total"} <= moved, (before, after)
    assert after["mxserve:expert_cache_hits_total"] + after["mxserve:expert_cache_misses_total"] > 0
    assert "mxserve:expert_cache_hits_total" not in runs["resident"]["after"] or \
        runs["resident"]["after"]["mxserve:expert_cache_misses_total"] == 0
