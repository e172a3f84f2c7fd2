"""Offline Hadamard rotation of the attention v/o pair (``mxserve.quant.hadamard``): orthogonality, exact function
preservation on tiny models (GQA, q/k norms, v bias), an incoherence gain on outlier columns, and ``--hadamard``
end to end through ``quantize_checkpoint`` (stored weights un-rotate to the source within the int8 SQNR floor)."""
from __future__ import annotations

import json

import pytest
import torch

from mxserve.checkpoint.hf_model import load_model
from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.quant.hadamard import (
    hadamard_matrix,
    random_hadamard,
    rotate_layer_attention,
    rotate_vo,
)
from mxserve.quant.primitives import quantize_rtn
from mxserve_kernels.formats import WeightScheme
from tests.tolerances import GEMM, SQNR_DB_MIN, sqnr_db

F32 = GEMM[torch.float32]


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128])
def test_hadamard_orthonormal(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), **F32)
    assert torch.equal(h.abs(), h[0, 0].expand(n, n))                 # every entry +-h00, h00 = 1/sqrt(n)
    torch.testing.assert_close(h[0, 0].item(), n ** -0.5, **F32)
    q = random_hadamard(n, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), **F32)
    assert torch.equal(q, random_hadamard(n, seed=3))          # reproducible from the seed


@pytest.mark.parametrize("n", [0, 3, 96])
def test_hadamard_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(n)


def test_rotate_vo_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="head_dim 32"):
        rotate_vo(torch.zeros(48, 16), None, torch.zeros(16, 96), random_hadamard(32, 0))


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe"])
def tiny(request, tmp_path_factory):
    from mxserve.models.tiny import make_tiny
    d = tmp_path_factory.mktemp(request.param)
    # GQA: 4 query heads read 2 kv heads; qwen3 has q/k norms, qwen2_moe has qkv biases
    return make_tiny(request.param, d / "src", layers=2, experts=4, top_k=2, hidden=64, inter=64, vocab=512,
                     heads=4, kv_heads=2, head_dim=32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_rotation_preserves_function(tiny):
    model = load_model(HFCheckpoint(tiny))
    g = torch.Generator().manual_seed(0)
    for layer in model.model.layers:       # non-zero biases so the bias rotation is exercised
        if layer.self_attn.v_proj.bias is not None:
            layer.self_attn.v_proj.bias.data = torch.randn(layer.self_attn.v_proj.bias.shape, generator=g)
    ids = torch.randint(0, 512, (2, 24), generator=g)
    ref = _logits(model, ids)
    before = {l: layer.self_attn.v_proj.weight.clone() for l, layer in enumerate(model.model.layers)}
    for l, layer in enumerate(model.model.layers):
        rotate_layer_attention(layer, layer.self_attn.head_dim, seed=l)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, before[0], **F32)  # weights moved
    torch.testing.assert_close(_logits(model, ids), ref, **F32)


def test_rotating_v_alone_breaks_function(tiny):
    """Negative control: the o_proj half of the pair is what makes the rotation exact."""
    model = load_model(HFCheckpoint(tiny))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    v, o = model.model.layers[0].self_attn.v_proj, model.model.layers[0].self_attn.o_proj
    vw, _, _ = rotate_vo(v.weight.data, None, o.weight.data, random_hadamard(32, 0))
    v.weight.data.copy_(vw)
    assert not torch.allclose(_logits(model, ids), ref, **F32)


def _o_proj_sqnr(w: torch.Tensor, q: torch.Tensor | None, scheme: WeightScheme) -> float:
    """SQNR of o_proj [H, N*D] RTN-quantized in the rotated basis (error measured back in the original one)."""
    d = 32
    wr = w if q is None else (w.double().reshape(w.shape[0], -1, d) @ q).reshape(w.shape).float()
    dq = quantize_rtn(wr, scheme)[2]
    back = dq if q is None else (dq.double().reshape(w.shape[0], -1, d) @ q.T).reshape(w.shape)
    return sqnr_db(w, back)


def test_rotation_gains_on_outlier_columns():
    """Incoherence: o_proj input columns with outliers (a few attention channels 20x larger) quantize better after
    the per-head rotation spreads them over the quantization group (group = head_dim)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[:, torch.randperm(128, generator=g)[:4]] *= 20.0
    s = WeightScheme(4, 32)
    plain, rot = _o_proj_sqnr(w, None, s), _o_proj_sqnr(w, random_hadamard(32, 0), s)
    assert rot > plain, (plain, rot)


def test_quantize_checkpoint_hadamard(tiny, tmp_path):
    from mxserve.quant.api import quantize_checkpoint
    kw = {"bits": 4.25, "calib": None, "method": "gptq", "attn_bits": 8, "group_size": 32, "uniform": True,
          "device": "cpu", "progress": False, "seq_len": 32, "n_samples": 4}
    with pytest.raises(ValueError, match="--attn-bits"):
        quantize_checkpoint(tiny, tmp_path / "x", **{**kw, "attn_bits": None}, hadamard=True)
    quantize_checkpoint(tiny, tmp_path / "h", **kw, hadamard=True)
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["quantization_config"]["meta"]["hadamard"]["layers"] == [0, 1]
    src, dst = HFCheckpoint(tiny), HFCheckpoint(tmp_path / "h")
    for l in range(2):
        q = random_hadamard(32, seed=l)
        v, o = (src.arch.attn_proj(l, p) for p in ("v_proj", "o_proj"))
        ref_v, ref_o = src.weight(v), src.weight(o)
        # undo the rotation on the stored (dequantized) weights: back to the source within int8 quality
        _, _, back_o = rotate_vo(ref_v, None, dst.weight(o), q.T)
        back_v = torch.einsum("ed,gdh->geh", q.float(), dst.weight(v).reshape(-1, 32, 64)).reshape(ref_v.shape)
        assert sqnr_db(ref_o, back_o) >= SQNR_DB_MIN[8]
        assert sqnr_db(ref_v, back_v) >= SQNR_DB_MIN[8]
        if src.has(f"{v}.bias"):
            assert dst.has(f"{v}.bias") and dst.tensor(f"{v}.bias").shape == src.tensor(f"{v}.bias").shape
    load_model(dst)   # loads (quantized linears keep their biases)
