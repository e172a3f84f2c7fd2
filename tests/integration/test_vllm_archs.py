"""GPU: ``vllm serve CKPT -q mxmoe`` of mixed-precision Qwen2-MoE (shared expert, vLLM's V2 model runner), Mixtral
and OLMoE checkpoints, one small server at a time (default torch.compile + CUDA graphs), official ``openai`` client.

Each checkpoint is a random ``make_tiny`` model re-written with an explicit mixed plan: experts cycle through
int2/int3/int4/int8 (g64 asym) and bf16, plus ``int1_g128_asym`` when the MoE kernels accept it (probed on the GPU
first; the JSON says which); attention q/k/v int8, o_proj int4, Qwen2-MoE's shared expert int4. Routed-expert weights
are scaled by EXPERT_GAIN so that the experts dominate the random model's output (routing errors become visible).
Checks per architecture: completion, chat and streaming answer; and correctness against the dequantized PyTorch
model (fp32, same quantized weights): the mean |logprob difference| of the prompt tokens between vLLM and the
reference is at most ``SELF_VS_WRONG_MAX`` of the difference between the reference and the same reference with its
routers rolled by one expert (a wiring bug such as a wrong expert order, a swapped gate/up or a wrong scheme lands
near 1.0; bf16 activation noise stays far below).
Run: ``pytest -m gpu tests/integration/test_vllm_archs.py`` (MXSERVE_TEST_JSON=path dumps the numbers).
"""
from __future__ import annotations

import json
import os

import pytest
from tests.helpers.results import record_result
import torch

pytestmark = pytest.mark.gpu

ARCHS = ["qwen2_moe", "mixtral", "olmoe"]
GEOM = dict(layers=2, experts=8, top_k=2, hidden=256, inter=128, vocab=1024, heads=4, kv_heads=2, head_dim=64)
EXPERT_SCHEMES = ["int2_g64_asym", "int3_g64_asym", "int4_g64_asym", "int8_g64_asym", "bf16"]
INT1 = "int1_g128_asym"
ATTN = {"q_proj": "int8_g64_asym", "k_proj": "int8_g64_asym", "v_proj": "int8_g64_asym", "o_proj": "int4_g64_asym"}
SHARED = "int4_g64_asym"
EXPERT_GAIN = 3.0  # routed-expert weights x3 before quantization: experts dominate the (random) residual stream
SELF_VS_WRONG_MAX = 0.2  # vLLM-vs-reference error / wrong-routing error (CPU bf16-vs-fp32 model: 0.01-0.04)
SERVER_ARGS = ["-q", "mxmoe", "--max-model-len", "512", "--gpu-memory-utilization", "0.10", "--max-num-seqs", "8",
               "--max-logprobs", "5", "--seed", "0"]
PROMPTS = ["import os\nimport sys\n\n\ndef main():\n    ", "class Foo:\n    def __init__(self, x):\n        self.",
           "for i in range(10):\n    print(", "def test_add():\n    assert add(1, 2) == "]


_result = record_result


def int1_supported() -> tuple[bool, str]:
    """Does the MoE kernel path (the one vLLM will use) run an int1 expert and match the dequantized reference?"""
    from mxserve.quant.primitives import rtn_tensors
    from mxserve.vllm_plugin import kernel_adapter as ka
    from mxserve_kernels.formats import WeightScheme
    from mxserve_kernels.quant.reference import dequantize
    try:
        s, h, i = WeightScheme.parse(INT1), GEOM["hidden"], GEOM["inter"]
        g = torch.Generator().manual_seed(0)
        gu, dn = rtn_tensors(torch.randn(2 * i, h, generator=g), s), rtn_tensors(torch.randn(h, i, generator=g), s)
        gu, dn = {k: v.cuda() for k, v in gu.items()}, {k: v.cuda() for k, v in dn.items()}
        w = ka.prepare_experts(gate_up=[(s, gu)], down=[(s, dn)], hidden=h, inter=i)
        x = torch.randn(4, h, device="cuda", dtype=torch.bfloat16)
        y = ka.experts_forward(x, w, torch.ones(4, 1, device="cuda"), torch.zeros(4, 1, dtype=torch.int32,
                                                                                   device="cuda"), None)
        a = x.float() @ dequantize(s, gu, h).t()
        ref = (torch.nn.functional.silu(a[:, :i]) * a[:, i:]) @ dequantize(s, dn, i).t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        return err < 0.05, f"relative error {err:.3g}"
    except Exception as e:  # the kernels do not know int1 yet: serve without it
        return False, f"{type(e).__name__}: {e}"[:300]


def plan_schemes(schemes: list[str], layer: int, n: int, offset: int) -> list[str]:
    return [schemes[(e + 2 * layer + offset) % len(schemes)] for e in range(n)]


def write_mixed(src: str, dst: str, expert_schemes: list[str]) -> dict:
    """Re-write bf16 checkpoint ``src`` as an mxmoe checkpoint with an explicit mixed plan (RTN). Returns the plan."""
    from mxserve.checkpoint.reader import HFCheckpoint
    from mxserve.checkpoint.writer import AtomicCheckpointWriter
    from mxserve.config import MxMoEConfig
    from mxserve.quant.primitives import rtn_tensors
    from mxserve_kernels.formats import WeightScheme
    ckpt = HFCheckpoint(src)
    a, geo = ckpt.arch, ckpt.geometry
    modules, experts = {}, {}
    for l in range(geo["layers"]):
        modules.update({a.attn_proj(l, p): s for p, s in ATTN.items()})
        if a.shared_expert:
            modules.update({a.shared_proj(l, w): SHARED for w in ("gate", "up", "down")})
        gu = plan_schemes(expert_schemes, l, geo["experts"], 0)
        dn = plan_schemes(expert_schemes, l, geo["experts"], 1)
        experts[a.experts_prefix(l)] = {"gate_up": gu, "down": dn}
        for e in range(geo["experts"]):
            for w in ("gate", "up", "down"):
                modules[a.expert_proj(l, e, w)] = (gu if w != "down" else dn)[e]
    plan = {"quant_method": "mxmoe", "version": 1, "default_scheme": "bf16",
            "modules": {m: s for m, s in modules.items() if ".experts." not in m}, "experts": experts,
            "meta": {"test": "test_vllm_archs mixed plan", "method": "rtn"}}
    qc = MxMoEConfig.from_dict(plan)
    with AtomicCheckpointWriter(dst) as w:
        for name in ckpt.names():
            mod, _, leaf = name.rpartition(".")
            s = modules.get(mod)
            t = ckpt.tensor(name)
            if ".experts." in mod and leaf == "weight":
                t = (t.float() * EXPERT_GAIN).to(t.dtype)
            if leaf == "weight" and s is not None and WeightScheme.parse(s).bits != 16:
                for suf, v in rtn_tensors(t.float(), WeightScheme.parse(s)).items():
                    w.add(f"{mod}.{suf}", v)
            else:
                w.add(name, t)
        w.commit(dict(ckpt.config, quantization_config=qc.to_dict()), copy_from=src)
    return plan


def int1_supported_isolated() -> tuple[bool, str]:
    """``int1_supported()`` in a fresh process: a kernel fault there cannot poison this process's CUDA context."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import json; from tests.integration.test_vllm_archs import int1_supported; "
            "print('INT1=' + json.dumps(int1_supported()))")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    line = next((l for l in r.stdout.splitlines() if l.startswith("INT1=")), None)
    if line is None:
        return False, f"probe process failed rc={r.returncode}: {r.stderr[-300:]}"
    ok, why = json.loads(line[5:])
    return bool(ok), why


@pytest.fixture(scope="module")
def expert_schemes():
    ok, why = int1_supported_isolated()
    _result("int1_g128_asym", {"served": ok, "probe": why})
    return EXPERT_SCHEMES + ([INT1] if ok else [])


def _client(srv):
    import openai
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120)


def _vllm_prompt_logprobs(srv, ids: list[int]) -> list[float]:
    """vLLM's logprob of each prompt token given its prefix (positions 1..P-1)."""
    r = _client(srv).completions.create(model="m", prompt=ids, max_tokens=1, temperature=0,
                                        extra_body={"prompt_logprobs": 1})
    pl = r.choices[0].model_extra["prompt_logprobs"]
    return [pos[str(t)]["logprob"] if str(t) in pos else pos[t]["logprob"] for pos, t in zip(pl[1:], ids[1:])]


def _reference_logprobs(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda")).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0].tolist()


def _roll_routers(model, num_experts: int) -> int:
    """Route every token to the wrong experts: roll each router's rows by one expert. Returns routers touched."""
    n = 0
    for name, p in model.named_parameters():
        if name.endswith("gate.weight") and "shared_expert_gate" not in name and p.shape[0] == num_experts:
            p.data = p.data.roll(1, 0)
            n += 1
    return n


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_checkpoint_serves(arch, expert_schemes, tmp_path):
    from transformers import AutoTokenizer

    from mxserve.checkpoint.hf_model import load_model
    from mxserve.checkpoint.reader import HFCheckpoint
    from mxserve.models.tiny import make_tiny
    from mxserve.vllm_plugin.server import VllmServer

    src = make_tiny(arch, tmp_path / "src", seed=1, **GEOM)
    dst = str(tmp_path / "mixed")
    plan = write_mixed(str(src), dst, expert_schemes)
    used = sorted({s for p in plan["experts"].values() for s in (*p["gate_up"], *p["down"])})
    assert set(used) == set(expert_schemes), used
    tok = AutoTokenizer.from_pretrained(dst)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]

    with VllmServer(dst, SERVER_ARGS, log_dir=str(tmp_path), label=f"{arch}-mixed") as srv:
        client = _client(srv)
        c = client.completions.create(model="m", prompt="def main(", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert c.usage.completion_tokens == 8 and isinstance(c.choices[0].text, str)
        ch = client.chat.completions.create(model="m", max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": "import os"}])
        assert ch.choices[0].message.role == "assistant" and ch.usage.completion_tokens >= 1
        chunks = list(client.chat.completions.create(model="m", max_tokens=8, temperature=0, stream=True,
                                                     messages=[{"role": "user", "content": "class Foo:"}],
                                                     extra_body={"ignore_eos": True}))
        assert sum(1 for x in chunks if x.choices and x.choices[0].delta.content) >= 2
        served = [_vllm_prompt_logprobs(srv, p) for p in ids]

    model = load_model(HFCheckpoint(dst), device="cuda", dtype=torch.float32)
    ref = [_reference_logprobs(model, p) for p in ids]
    assert _roll_routers(model, GEOM["experts"]) == GEOM["layers"]
    wrong = [_reference_logprobs(model, p) for p in ids]
    d_served = _mean_abs(served, ref)
    d_wrong = _mean_abs(wrong, ref)
    _result(f"archs.{arch}", {"schemes": used, "mean_abs_dlogprob_vllm_vs_ref": d_served,
                              "mean_abs_dlogprob_wrong_routing_vs_ref": d_wrong})
    assert d_wrong > 0
    assert d_served <= SELF_VS_WRONG_MAX * d_wrong, (
        f"{arch}: vLLM vs dequantized reference |dlogprob| {d_served:.4f} vs wrong routing {d_wrong:.4f}")


def _mean_abs(a: list[list[float]], b: list[list[float]]) -> float:
    diffs = [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return sum(diffs) / len(diffs)
