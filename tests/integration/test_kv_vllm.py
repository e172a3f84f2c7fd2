"""GPU: the packed K2V1.5 KV cache inside ``vllm serve --quantization mxmoe`` (bf16 weights, KV-only config).

One random tiny Qwen3-MoE (head_dim 128, ``make_tiny``), copied twice: ``bf16/`` (no quantization_config) and
``kv/`` (``mxserve calibrate-kv --kv K2V1.5`` writes a KV-only mxmoe quantization_config). Servers strictly one after
the other (vLLM's memory profiling fails when another server grows during it), default torch.compile + CUDA graphs:
  1. bf16 (reference): KV capacity, full-vocab prompt logprobs, and full-vocab logprobs along its greedy output G.
  2. ours (V1 model runner, the default for MoE models): KV capacity >= CAPACITY_MIN x bf16's (the issue's target;
     the real page is P * H * 70 B vs P * H * 512 B), prompt logprobs == bf16's (prefill without context is full
     precision: KLD <= KLD_W8_MAX), greedy decode of 8 concurrent prompts (uniform decode batches replay the FULL
     CUDA graph over packed pages), then 100-token prompts twice (the 2nd hits the prefix cache: continuation
     prefill over dequantized pages): well-formed output, finite logprobs, and along the stretch where our tokens equal
     G (same context) our chosen-token logprobs within DECODE_LOGPROB_DELTA_MAX of bf16's; and our decode logprobs
     are closer to the torch reference of the same packed cache (``mxserve.kvcache.quality``, HF fp32, prompt
     prefilled exactly, past-only decode) than to the unquantized model: vLLM really runs the packed semantics.
  3. ours under the V2 model runner (VLLM_USE_V2_MODEL_RUNNER=1, dense models' default): starts, sizes the cache
     from the packed page, greedy output well-formed.
Run: ``pytest -m gpu tests/integration/test_kv_vllm.py`` (MXSERVE_TEST_JSON=path dumps the numbers,
MXSERVE_TEST_LOG_DIR=dir keeps the server logs).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.tolerances import KLD_W8_MAX
from tests.helpers.logprobs import mean_prompt_kld
from tests.helpers.results import record_result

pytestmark = pytest.mark.gpu

CAPACITY_MIN = 7.0               # issue 6 acceptance: K2V1.5 capacity >= 7x --kv-cache-dtype auto
# mean |logprob(ours) - logprob(bf16)| of the chosen token, same context: the torch reference of this checkpoint's
# K2V1.5 past-only cache gives 0.24 (random weights: near-uniform attention, so 2-bit noise moves the logits a lot);
# this bound only catches a broken decode, test_decode_tracks_quantized_reference checks the semantics
DECODE_LOGPROB_DELTA_MAX = 1.0
GEN_TOKENS, N_PROMPTS = 32, 8
SERVER_ARGS = ["--max-model-len", "1024", "--gpu-memory-utilization", "0.1", "--max-num-seqs", "16",
               "--max-logprobs", "-1", "--seed", "0"]
PROMPTS = ["import os\nimport sys\n\n\ndef main", "class Foo:\n    def __init__(self", "    for i in range(",
           "def test_", "        return self.", "if __name__ == ", "    @property\n    def ", "try:\n    import "]
_CAP_RE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


_result = record_result


def kv_capacity(log_text: str) -> int:
    """vLLM's "GPU KV cache size: N tokens" from a server log (ValueError naming the log when absent)."""
    m = _CAP_RE.search(log_text)
    if m is None:
        raise ValueError("server log has no 'GPU KV cache size: N tokens' line")
    return int(m.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from mxserve.models.tiny import make_tiny
    root = tmp_path_factory.mktemp("kvckpt")
    bf16 = make_tiny("qwen3_moe", root / "bf16", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=128,
                     vocab=512, seed=0)
    kv = root / "kv"
    shutil.copytree(bf16, kv)
    subprocess.run([sys.executable, "-m", "mxserve.cli.main", "calibrate-kv", str(kv), "--kv", "K2V1.5",
                    "--num-seqs", "2", "--seq-len", "256", "--device", "cuda"], check=True)
    qc = json.loads((kv / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mxmoe" and qc["kv"]["meta"]["layer_labels"] == ["K2V1.5", "K2V1.5"]
    return {"bf16": str(bf16), "kv": str(kv)}


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return os.environ.get("MXSERVE_TEST_LOG_DIR") or str(tmp_path_factory.mktemp("logs"))


@pytest.fixture(scope="module")
def prompt_ids(ckpts):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpts["bf16"])
    return [tok(s, add_special_tokens=False)["input_ids"] for s in PROMPTS[:N_PROMPTS]]


def _client(srv):
    import openai
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=180)


def _prompt_logprobs(srv, ids: list[int]) -> list[dict[int, float]]:
    """Full-vocab logprobs of positions 1..len(ids)-1 given their prefixes (one prefill)."""
    r = _client(srv).completions.create(model="m", prompt=ids, max_tokens=1, temperature=0,
                                        extra_body={"prompt_logprobs": -1})
    pl = r.choices[0].model_extra["prompt_logprobs"]
    return [{int(k): v["logprob"] for k, v in pos.items()} for pos in pl[1:]]


def _greedy(srv, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Greedy continuations of all prompts in one request (concurrent decode): (token ids, chosen logprobs)."""
    r = _client(srv).completions.create(model="m", prompt=prompts, max_tokens=GEN_TOKENS, temperature=0, logprobs=1,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
    out = [None] * len(prompts)
    for c in r.choices:
        out[c.index] = (list(c.model_extra["token_ids"]), list(c.logprobs.token_logprobs))
    return out


def _well_formed(gens) -> None:
    for ids, lps in gens:
        assert len(ids) == GEN_TOKENS and len(lps) == GEN_TOKENS, f"{len(ids)} tokens, expected {GEN_TOKENS}"
        assert all(lp is not None and math.isfinite(lp) and lp <= 1e-6 for lp in lps), f"bad logprobs {lps}"


@pytest.fixture(scope="module")
def bf16_run(ckpts, prompt_ids, logs):
    from mxserve.vllm_plugin.server import VllmServer
    with VllmServer(ckpts["bf16"], SERVER_ARGS, log_dir=logs, label="kv-bf16") as srv:
        gens = _greedy(srv, prompt_ids)
        prompt_lp = [_prompt_logprobs(srv, ids) for ids in prompt_ids]
        along = [_prompt_logprobs(srv, ids + g[0])[len(ids) - 1:] for ids, g in zip(prompt_ids, gens)]
        cap = kv_capacity(srv.log_text())
    return {"capacity": cap, "gens": gens, "prompt_lp": prompt_lp, "along": along}


@pytest.fixture(scope="module")
def kv_run(ckpts, prompt_ids, logs, bf16_run):
    from mxserve.vllm_plugin.server import VllmServer
    with VllmServer(ckpts["kv"], ["-q", "mxmoe", *SERVER_ARGS], log_dir=logs, label="kv-k2v1.5") as srv:
        gens = _greedy(srv, prompt_ids)          # nothing cached yet: one exact prefill, then packed decode
        prompt_lp = [_prompt_logprobs(srv, ids) for ids in prompt_ids]   # prompt_logprobs never read the cache
        long = [(ids * 8)[:100] for ids in prompt_ids]
        cont = [_greedy(srv, long), _greedy(srv, long)]  # 2nd: prefix-cache hits -> continuation over packed pages
        text = srv.log_text()
    return {"capacity": kv_capacity(text), "gens": gens, "prompt_lp": prompt_lp, "cont": cont}


def test_capacity_vs_bf16(bf16_run, kv_run):
    ratio = kv_run["capacity"] / bf16_run["capacity"]
    _result("kv_capacity_tokens", {"bf16": bf16_run["capacity"], "K2V1.5": kv_run["capacity"], "ratio": ratio})
    assert ratio >= CAPACITY_MIN, (f"K2V1.5 KV capacity {kv_run['capacity']:,} tokens = {ratio:.2f}x bf16's "
                                   f"{bf16_run['capacity']:,} (need >= {CAPACITY_MIN}x)")


def test_prefill_matches_bf16(bf16_run, kv_run):
    kld, n = mean_prompt_kld(bf16_run["prompt_lp"], kv_run["prompt_lp"])
    _result("kv_prefill_kld_vs_bf16", kld)
    assert kld <= KLD_W8_MAX, f"prefill (full precision) KLD(bf16 || ours) = {kld:.2e} over {n} positions"


def test_greedy_decode_well_formed_and_close(bf16_run, kv_run):
    _well_formed(bf16_run["gens"])
    _well_formed(kv_run["gens"])
    for gens in kv_run["cont"]:
        _well_formed(gens)
    deltas, agree = [], 0
    for (ref_ids, _), along, (ids, lps) in zip(bf16_run["gens"], bf16_run["along"], kv_run["gens"]):
        for t, (tok, lp) in enumerate(zip(ids, lps)):
            # same context as bf16's greedy run up to t-1: compare the chosen token's logprob
            deltas.append(abs(lp - along[t].get(tok, min(along[t].values()))))
            if tok != ref_ids[t]:
                break
            agree += 1
    total = N_PROMPTS * GEN_TOKENS
    mean_delta = sum(deltas) / len(deltas)
    _result("kv_decode_vs_bf16", {"agree_prefix_tokens": agree, "total": total, "mean_abs_logprob_delta": mean_delta,
                                  "positions": len(deltas)})
    assert mean_delta <= DECODE_LOGPROB_DELTA_MAX, (
        f"K2V1.5 decode: mean |logprob delta| vs bf16 = {mean_delta:.3f} over {len(deltas)} same-context positions "
        f"(greedy agreed on {agree}/{total} tokens)")


def test_v2_model_runner(ckpts, prompt_ids, logs, kv_run):
    from mxserve.vllm_plugin.server import VllmServer
    with VllmServer(ckpts["kv"], ["-q", "mxmoe", *SERVER_ARGS], log_dir=logs, label="kv-k2v1.5-v2",
                    env={"VLLM_USE_V2_MODEL_RUNNER": "1"}) as srv:
        gens = _greedy(srv, prompt_ids)
        cap = kv_capacity(srv.log_text())
    _result("kv_v2_runner", {"capacity": cap, "v1_capacity": kv_run["capacity"], "same_tokens_as_v1": sum(
        a[0] == b[0] for a, b in zip(gens, kv_run["gens"]))})
    _well_formed(gens)
    # the V2 runner profiles memory on its own, so only require that it sized the cache from the packed page
    assert cap > 2 * kv_run["capacity"] / CAPACITY_MIN, f"V2 runner capacity {cap:,} vs V1's {kv_run['capacity']:,}"


def test_decode_tracks_quantized_reference(ckpts, prompt_ids, kv_run):
    import torch
    from transformers import AutoModelForCausalLM

    from mxserve.kvcache import quality as Q
    from mxserve.kvcache.config import KVQuantConfig
    kvc = KVQuantConfig.from_dict(json.loads(open(os.path.join(ckpts["kv"], "config.json")).read())
                                  ["quantization_config"]["kv"])
    model = AutoModelForCausalLM.from_pretrained(ckpts["bf16"], dtype=torch.float32).cuda().eval()
    d = model.config.head_dim
    d_ref, d_bf16 = [], []
    for ids, (gen, lps) in zip(prompt_ids, kv_run["gens"]):
        seq = torch.tensor([ids + gen[:-1]])
        packed = Q.mx_mode("K2V1.5", kvc, d, 0, 0)
        packed.mask_fn = Q.vllm_mask(len(ids))
        for store, mode in ((d_ref, packed), (d_bf16, Q.bf16_mode())):
            lp = torch.log_softmax(Q.run_mode(model, seq, mode)[0, len(ids) - 1:], -1)
            ref = lp.gather(-1, torch.tensor(gen)[:, None])[:, 0]
            store.extend((ref[1:] - torch.tensor(lps[1:])).abs().tolist())  # decode steps only (t >= 1)
    mean_ref, mean_bf16 = sum(d_ref) / len(d_ref), sum(d_bf16) / len(d_bf16)
    _result("kv_decode_vs_torch_reference", {"mean_abs_delta_vs_packed_ref": mean_ref,
                                             "mean_abs_delta_vs_unquantized": mean_bf16, "positions": len(d_ref)})
    # CPU proxy (HF bf16 compute vs this fp32 reference, same checkpoint and prompts): 0.033 vs 0.124
    assert mean_ref < 0.5 * mean_bf16, (
        f"vLLM K2V1.5 decode logprobs: mean |delta| {mean_ref:.3f} vs the packed-cache torch reference, "
        f"{mean_bf16:.3f} vs the unquantized model (expected much closer to the packed reference)")
