"""GPU x2: mxmoe under tensor parallel 2 and ``--enable-expert-parallel`` (``nvidia-h200-x2``), and the clear load
error when a group size cannot divide I/tp. Same W4 demo checkpoint as test_vllm_serve; greedy outputs of TP2 / EP
must equal the single-GPU server's for most tokens (reductions differ in order only)."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs (nvidia-h200-x2)")]

PARALLEL_AGREE_MIN = 0.9  # TP/EP vs 1 GPU greedy agreement (bf16 reduction order differs)
# The device hosts have NVLink multicast switched off (KINDS.md); vLLM 0.26's default TP allreduce+RMSNorm fusion
# auto-selects FlashInfer's "mnnvl" backend, which needs multicast: on 2026-11-22 the TP2 server died in its profile
# run with an illegal memory access right after "Initialized FlashInfer Allreduce norm fusion workspace with
# backend=mnnvl". So the fusion is off and the backend pinned to trtllm here (not a plugin requirement).
NO_MNNVL = ["--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}']
NO_MNNVL_ENV = {"VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm"}
ARGS = ["-q", "mxmoe", "--max-model-len", "512", "--gpu-memory-utilization", "0.12", "--max-num-seqs", "16",
        *NO_MNNVL]
PROMPTS = ["import os\n", "def main(", "class Foo:\n", "for i in range("]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from mxserve.models.demo import ensure_demo_model
    from mxserve.quant.api import quantize_checkpoint
    src = ensure_demo_model(preset="cpu", progress=False)  # hidden 128, moe inter 128
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, g in (("g64", 64), ("g128", 128)):
        quantize_checkpoint(str(src), str(root / name), bits=4.5, calib=None, method="rtn", uniform=True,
                            attn_bits=4, group_size=g, progress=False)
        out[name] = str(root / name)
    return out


def _greedy(srv) -> list[str]:
    import openai
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120)
    r = c.completions.create(model="m", prompt=PROMPTS, max_tokens=32, temperature=0, extra_body={"ignore_eos": True,
                                                                                             "return_token_ids": True})
    return [c_.model_extra["token_ids"] for c_ in sorted(r.choices, key=lambda c_: c_.index)]


def test_tp2_and_ep_match_single_gpu(ckpts, tmp_path):
    from mxserve.vllm_plugin.server import VllmServer
    outs = {}
    for name, extra, env in (("tp1", [], {"CUDA_VISIBLE_DEVICES": "0", **NO_MNNVL_ENV}),
                             ("tp2", ["--tensor-parallel-size", "2"], NO_MNNVL_ENV),
                             ("ep2", ["--tensor-parallel-size", "2", "--enable-expert-parallel"], NO_MNNVL_ENV)):
        with VllmServer(ckpts["g64"], ARGS + extra, log_dir=str(tmp_path), env=env) as srv:
            outs[name] = _greedy(srv)
    for name in ("tp2", "ep2"):
        pairs = [(a, b) for x, y in zip(outs["tp1"], outs[name]) for a, b in zip(x, y)]
        frac = sum(a == b for a, b in pairs) / len(pairs)
        assert frac >= PARALLEL_AGREE_MIN, f"{name}: greedy agreement with 1 GPU {frac:.2f}"


def test_group_size_not_dividing_inter_per_rank_errors(ckpts, tmp_path):
    from mxserve.vllm_plugin.server import VllmServer
    srv = VllmServer(ckpts["g128"], ARGS + ["--tensor-parallel-size", "2"], log_dir=str(tmp_path),
                     env=NO_MNNVL_ENV).start()
    rc = srv.wait_exit(300)
    log = srv.log_tail(400)
    srv.stop()
    assert rc != 0 and "group size 128, which does not divide the per-rank in_features K/tp = 128/2 = 64" in log
