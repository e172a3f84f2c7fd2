"""Contract: mxmoe fused-MoE method on vLLM's real ``FusedMoE`` (MoERunner + RoutedExperts, CPU platform):
create_weights -> ``MoERunner.load_weights`` with per-expert canonical tensors -> process -> apply / forward,
against a dequantized fp32 per-expert reference."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mxserve.config import MxMoEConfig
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant.reference import dequantize
from tests.contract.rtn import quantize_rtn
from tests.tolerances import GEMM

E, TOPK, H, I = 8, 2, 128, 64
GATE_UP = ["int4_g32_asym", "int2_g32_asym_nested3", "int8_g64_sym", "bf16", "int3_g32_asym",
           "int4_g64_sym_fp16", "int2_g32_asym", "int4_g32_asym"]
DOWN = ["int2_g32_asym", "int4_g32_asym", "bf16", "int8_g32_asym", "int2_g32_asym_nested4",
        "int3_g32_asym", "int4_g64_asym", "int8_g64_sym"]


_layer_ids = itertools.count()


def _build(vllm_cpu, gate_up=GATE_UP, down=DOWN, inter=I):
    """A FusedMoE with a fresh layer index (vLLM refuses duplicate MoE layer names); returns (runner, prefix)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoE
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    pfx = f"model.layers.{next(_layer_ids)}.mlp.experts"
    cfg = MxMoEQuantConfig(MxMoEConfig.from_dict({"quant_method": "mxmoe", "version": 1,
                                                  "experts": {pfx: {"gate_up": gate_up, "down": down}}}))
    with set_current_vllm_config(vllm_cpu):
        return FusedMoE(num_experts=E, top_k=TOPK, hidden_size=H, intermediate_size=inter, params_dtype=torch.float32,
                        quant_config=cfg, prefix=pfx), pfx


def _checkpoint(gate_up=GATE_UP, down=DOWN):
    """HF-named per-expert canonical tensors (relative to the experts module) + fp32 dequantized references."""
    weights, ref = [], []
    for e in range(E):
        sg, sd = WeightScheme.parse(gate_up[e]), WeightScheme.parse(down[e])
        g, u, d = (quantize_rtn(torch.randn(I, H) * 0.1, sg), quantize_rtn(torch.randn(I, H) * 0.1, sg),
                   quantize_rtn(torch.randn(H, I) * 0.1, sd))
        for proj, t in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
            weights += [(f"{e}.{proj}.{suf}", v) for suf, v in t.items()]
        ref.append((torch.cat([dequantize(sg, g, H), dequantize(sg, u, H)]), dequantize(sd, d, I)))
    return weights, ref


def _reference(x, ref, topk_weights, topk_ids):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            w13, w2 = ref[int(topk_ids[t, k])]
            h = w13 @ x[t]
            out[t] += topk_weights[t, k] * (w2 @ (F.silu(h[:I]) * h[I:]))
    return out


def test_mixed_experts_apply_and_forward(vllm_cpu):
    from mxserve.vllm_plugin.moe_method import MxMoEMethod
    moe, PFX = _build(vllm_cpu)
    re_ = moe.routed_experts
    assert isinstance(re_.quant_method, MxMoEMethod)
    weights, ref = _checkpoint()
    loaded = set(moe.load_weights(iter(weights)))
    assert {"w13_qweight", "w2_qweight", "w13_weight", "w2_weight", "w13_plane3_weight"} <= loaded
    re_.quant_method.process_weights_after_loading(re_)
    assert not any(n.startswith(("w13_", "w2_")) for n, _ in re_.named_parameters())  # canonical params dropped

    x = torch.randn(6, H)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 3], [5, 7]], dtype=torch.int32)
    w = torch.rand(6, TOPK)
    out = re_.quant_method.apply(re_, x, w, ids, None, None)
    torch.testing.assert_close(out, _reference(x, ref, w, ids), **GEMM[torch.float32])

    # the runner's entry (routing itself needs _moe_C ops: covered by the GPU tests)
    full = re_.forward_modular(x, w, ids)
    torch.testing.assert_close(full, out, **GEMM[torch.float32])


def test_missing_expert_tensor_is_named(vllm_cpu):
    from mxserve.vllm_plugin.loading import MissingTensorError
    moe, PFX = _build(vllm_cpu)
    weights, _ = _checkpoint()
    weights = [(n, t) for n, t in weights if n not in ("3.down_proj.scales", "5.up_proj.qweight")]
    list(moe.load_weights(iter(weights)))
    re_ = moe.routed_experts
    with pytest.raises(MissingTensorError, match=rf"{PFX}\.3\.down_proj\.scales.*{PFX}\.5\.up_proj\.qweight"):
        re_.quant_method.process_weights_after_loading(re_)


def test_unexpected_expert_tensor_is_named(vllm_cpu):
    from mxserve.vllm_plugin.loading import UnexpectedTensorError
    moe, PFX = _build(vllm_cpu)
    # expert 2 gate_up is int8 *symmetric*: a zeros tensor for it is not part of the plan
    with pytest.raises(UnexpectedTensorError, match=rf"{PFX}\.2\.gate_proj\.zeros"):
        list(moe.load_weights(iter([("2.gate_proj.zeros", torch.zeros(I, H // 64, dtype=torch.bfloat16))])))


def test_wrong_shape_is_named(vllm_cpu):
    from mxserve.vllm_plugin.loading import UnexpectedTensorError
    moe, PFX = _build(vllm_cpu)
    with pytest.raises(UnexpectedTensorError, match=rf"{PFX}\.0\.down_proj\.qweight: shape"):
        list(moe.load_weights(iter([("0.down_proj.qweight", torch.zeros(H, 3, dtype=torch.uint8))])))


def test_group_size_not_dividing_inter_errors(vllm_cpu):
    with pytest.raises(ValueError, match=r"group size 64.*K/tp = 96/1 = 96"):
        _build(vllm_cpu, down=["int4_g64_asym"] * E, gate_up=["int4_g64_asym"] * E, inter=96)


def test_plan_expert_count_mismatch(vllm_cpu):
    with pytest.raises(ValueError, match="plan lists 4 experts, the model has 8"):
        _build(vllm_cpu, gate_up=GATE_UP[:4], down=DOWN[:4])


def test_layout_is_canonical_size():
    from mxserve.vllm_plugin.moe_method import plan_layout
    schemes = [WeightScheme.parse(n) for n in GATE_UP]
    regions, totals = plan_layout(schemes, 2 * I, H, torch.bfloat16)
    for s, reg in zip(schemes, regions):
        canonical = quantize_rtn(torch.randn(2 * I, H), s)
        assert sum(r.nbytes for r in reg.values()) == sum(t.numel() * t.element_size() for t in canonical.values())
        assert {n: r.shape for n, r in reg.items()} == {n: tuple(t.shape) for n, t in canonical.items()}
    assert all(sum(1 for reg in regions for r in reg.values() if r.offset % 16) == 0 for _ in [0])
    assert totals["qweight"] >= sum(reg["qweight"].nbytes for reg in regions if "qweight" in reg)
