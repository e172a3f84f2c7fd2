"""The engine serving an mxmoe checkpoint: the forward equals transformers run on the checkpoint's dequantized
weights (canonical-format oracle ``mxserve_kernels.quant.reference.dequantize``), and memory is reported by
precision."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mxserve.config.quant_config import MxMoEConfig
from mxserve.engine.kv_cache import make_cache_factory
from mxserve.engine.model import MoEModel
from mxserve_kernels.formats import NESTED_BASE_BITS, WeightScheme, tensor_names
from mxserve_kernels.quant.reference import dequantize
from tests.tolerances import GEMM, SQNR_DB_MIN, sqnr_db
from tests.unit.test_serve_openai import tiny_model_dir


def _scheme_of(cfg: MxMoEConfig, module: str) -> WeightScheme:
    if ".experts." in module:
        prefix, rest = module.split(".experts.")
        e, proj = rest.split(".")
        plan = cfg.experts[prefix + ".experts"]
        return (plan.down if proj == "down_proj" else plan.gate_up)[int(e)]
    return cfg.scheme_for(module)


def _dequantized_hf_dir(qdir, out):
    """Write an fp32 HF checkpoint whose linears are the dequantized mxmoe weights."""
    conf = json.loads((qdir / "config.json").read_text())
    qc = MxMoEConfig.from_dict(conf.pop("quantization_config"))
    where = {k: safe_open(str(p), "pt") for p in sorted(qdir.glob("*.safetensors"))
             for k in safe_open(str(p), "pt").keys()}
    sd = {}
    for name in where:
        f = where[name]
        module, suffix = name.rsplit(".", 1)
        if suffix == "qweight":
            s = _scheme_of(qc, module)
            t = {n: where[f"{module}.{n}"].get_tensor(f"{module}.{n}") for n in tensor_names(s)}
            k = t["qweight"].shape[1] * 8 // (NESTED_BASE_BITS if s.nested else s.bits)
            sd[f"{module}.weight"] = dequantize(s, t, k)
        elif suffix in ("weight", "bias"):
            sd[name] = f.get_tensor(name).float()
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    conf["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(conf))
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_mxmoe_checkpoint_matches_transformers_on_dequantized_weights(tmp_path_factory, nested):
    from transformers import AutoModelForCausalLM

    from mxserve.quant.api import quantize_checkpoint
    src = tiny_model_dir(tmp_path_factory)
    work = tmp_path_factory.mktemp("q")
    quantize_checkpoint(src, work / "q", bits=3.25, calib=None, method="rtn", device="cpu", progress=False,
                        group_size=32, nested=nested, attn_bits=8)
    model = MoEModel.load(work / "q")
    assert model.quantized
    assert any(p.startswith("int") for p in model.weight_bytes) and model.weight_bytes.get("int8", 0) > 0
    hf = AutoModelForCausalLM.from_pretrained(str(_dequantized_hf_dir(work / "q", work / "deq")),
                                              dtype=torch.float32).eval()
    ids = torch.randint(0, model.spec.vocab, (13,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    cache = model.new_cache(make_cache_factory("fp32"))
    out = model.logits(model.forward(ids, torch.arange(13), [(0, 13)], [cache], all_tokens=True))
    torch.testing.assert_close(out, ref, **GEMM[torch.float32])
    # the quantized checkpoint is a different model than its bf16 source (the weights really were replaced)
    base = MoEModel.load(src)
    base_out = base.logits(base.forward(ids, torch.arange(13), [(0, 13)], [base.new_cache(make_cache_factory("fp32"))],
                                        all_tokens=True))
    assert not torch.allclose(base_out, out, **GEMM[torch.float32])


def test_checkpoint_kv_config_selects_mxkv_cache(tmp_path_factory):
    """``quantization_config.kv`` is picked up (``--kv-cache-dtype auto``): prefill is exact, decode reads packed
    2-bit slots outside the FP sink/window and stays close to the full-precision cache."""
    import shutil

    from mxserve.engine.kv_cache import MxKVCache
    from mxserve.kvcache.config import KVQuantConfig
    src = tiny_model_dir(tmp_path_factory)
    dst = tmp_path_factory.mktemp("kv") / "m"
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    kv = KVQuantConfig.uniform(conf["num_hidden_layers"], 2, 2, 16, 16, sink_tokens=1, window_tokens=2)
    conf["quantization_config"] = {"quant_method": "mxmoe", "version": 1, "kv": kv.to_dict()}
    (dst / "config.json").write_text(json.dumps(conf))
    model = MoEModel.load(dst)
    factory = make_cache_factory("auto", model.kv_config)
    ids = torch.randint(0, model.spec.vocab, (12,))
    outs = {}
    for name, f in (("mxkv", factory), ("fp32", make_cache_factory("fp32"))):
        cache = model.new_cache(f)
        pre = model.logits(model.forward(ids[:8], torch.arange(8), [(0, 8)], [cache]))
        dec = [model.logits(model.forward(ids[i:i + 1], torch.tensor([i]), [(0, 1)], [cache])) for i in range(8, 12)]
        outs[name] = (pre, torch.cat(dec), cache)
    assert isinstance(outs["mxkv"][2], MxKVCache) and outs["mxkv"][2].bits_per_element <= 4  # 2-bit codes + fp16 scale/zero per 16
    torch.testing.assert_close(outs["mxkv"][0], outs["fp32"][0], **GEMM[torch.float32])
    assert not torch.equal(outs["mxkv"][1], outs["fp32"][1])
    # quantization error, not kernel error: judged in SQNR (2-bit floor of the table; no KV-specific entry yet)
    assert sqnr_db(outs["fp32"][1], outs["mxkv"][1]) >= SQNR_DB_MIN[2]
