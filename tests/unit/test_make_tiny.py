"""make-tiny checkpoints load in transformers with every tensor accounted for, for all four archs."""
import json

import pytest
import torch

from mxserve.cli.main import main
from mxserve.models.arch import ARCHS
from mxserve.models.tiny import hub_tensor_shapes, build_config, PRESETS


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_make_tiny_loads_in_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / arch
    assert main(["make-tiny", "--arch", arch, "--out", str(out), "--layers", "2", "--device", "cpu"]) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [ARCHS[arch].hf_architecture]
    a = ARCHS[arch]
    assert a.geometry(cfg)["experts"] == 8
    tok = AutoTokenizer.from_pretrained(out)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    assert int(ids.max()) < cfg["vocab_size"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"]) and torch.isfinite(logits).all()
    # the expert tensors follow the arch's hub naming
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert f"{a.expert_proj(1, 7, 'down')}.weight" in keys


def test_make_tiny_refuses_existing_and_bad_geometry(tmp_path):
    (tmp_path / "x").mkdir()
    assert main(["make-tiny", "--out", str(tmp_path / "x")]) == 2
    assert main(["make-tiny", "--out", str(tmp_path / "y"), "--top-k", "9"]) == 2
    assert not (tmp_path / "y").exists()


def test_preset_geometry_shapes():
    arch, kw = PRESETS["qwen3-30b-a3b"]
    cfg = build_config(arch, dict(kw, num_hidden_layers=1))
    shapes = dict(hub_tensor_shapes(arch, cfg))
    assert shapes["model.layers.0.mlp.experts.127.gate_proj.weight"] == (768, 2048)
    assert shapes["model.layers.0.mlp.experts.0.down_proj.weight"] == (2048, 768)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert total > 1.0e9 and total < 1.5e9  # one layer (~0.63B) + untied embeddings (0.62B) of the 30B model
