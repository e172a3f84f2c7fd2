"""SyntheticCheckpoint: preset geometry in memory, deterministic tensors, quantizable end to end (tiny dims)."""
from __future__ import annotations

import pytest
import torch

from mxserve.checkpoint.hf_model import build_skeleton, materialize
from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.checkpoint.synthetic import SyntheticCheckpoint
from mxserve.models.tiny import PRESETS, build_config, hub_tensor_shapes
from tests.tolerances import BIT_EXACT

SMALL = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, num_experts=8, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512)


def small(layers=2, seed=0):
    return SyntheticCheckpoint("qwen3-30b-a3b", layers=layers, seed=seed, device="cpu", overrides=SMALL)


def test_full_geometry_matches_make_tiny_preset_without_allocating():
    ck = SyntheticCheckpoint("qwen3-30b-a3b", layers=48, device="cpu")
    arch, kw = PRESETS["qwen3-30b-a3b"]
    assert ck.geometry == {"layers": 48, "experts": 128, "top_k": 8, "hidden": 2048, "inter": 768}
    assert ck.shapes == dict(hub_tensor_shapes(arch, build_config(arch, kw)))


def test_tensors_are_deterministic_and_distinct():
    a, b = small(seed=3), small(seed=3)
    n1 = "model.layers.1.mlp.experts.5.down_proj.weight"
    n2 = "model.layers.1.mlp.experts.6.down_proj.weight"
    torch.testing.assert_close(a.tensor(n1), b.tensor(n1), **BIT_EXACT)
    assert not torch.equal(a.tensor(n1), a.tensor(n2))
    assert not torch.equal(a.tensor(n1), small(seed=4).tensor(n1))
    assert a.tensor(n1).dtype == torch.bfloat16 and 0.015 < float(a.tensor(n1).float().std()) < 0.025
    assert torch.equal(a.tensor("model.norm.weight"), torch.ones(128, dtype=torch.bfloat16))


def test_unknown_preset_and_missing_tensor_are_named():
    with pytest.raises(ValueError, match="'nope': unknown preset"):
        SyntheticCheckpoint("nope", layers=2)
    with pytest.raises(ValueError, match="model.layers.9.x.weight"):
        small().tensor("model.layers.9.x.weight")


def test_one_layer_materialises_in_the_fused_layout():
    ck = small()
    model = build_skeleton(ck, torch.float32)
    layer = model.model.layers[1]
    materialize(ck, layer, "model.layers.1", torch.float32, "cpu")
    gu = layer.mlp.experts.gate_up_proj
    assert gu.shape == (8, 256, 128)
    torch.testing.assert_close(gu[3, 128:], ck.tensor("model.layers.1.mlp.experts.3.up_proj.weight").float(),
                               **BIT_EXACT)
    assert model.model.layers[0].mlp.experts.gate_up_proj.is_meta   # only the opened layer is real


@pytest.mark.slow
def test_quantize_synthetic_source_end_to_end(tmp_path):
    from mxserve.quant.api import quantize_checkpoint
    ck = small()
    s = quantize_checkpoint(None, tmp_path / "q", bits=2.25, calib=None, synthetic=ck, device="cpu", progress=False,
                            n_samples=4, seq_len=32, method="rtn", uniform=True)
    out = HFCheckpoint(tmp_path / "q")
    assert s["layers"] == 2 and s["timings"]["per_layer_s"] > 0 and s["avg_bits"] == 2.25
    assert out.geometry == ck.geometry and out.quant.meta["calibration"]["source"] == "synthetic-random"
    name = "model.layers.0.self_attn.q_proj.weight"      # bf16 passthrough equals the generated tensor
    torch.testing.assert_close(out.tensor(name), ck.tensor(name), **BIT_EXACT)
    with pytest.raises(ValueError, match="--calib cannot be combined"):
        quantize_checkpoint(None, tmp_path / "r", bits=2.25, calib="x.txt", synthetic=ck, device="cpu")
