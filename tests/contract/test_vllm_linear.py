"""Contract: mxmoe linear method on vLLM's real linear layers (CPU platform): create_weights -> vLLM weight loaders
with canonical tensors -> process_weights_after_loading -> apply, against the dequantized fp32 reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mxserve.config import MxMoEConfig
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant.reference import dequantize
from tests.contract.rtn import quantize_rtn
from tests.tolerances import GEMM

H = 128
PFX = "model.layers.0"


def _cfg(modules: dict[str, str]):
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    return MxMoEQuantConfig(MxMoEConfig.from_dict({"quant_method": "mxmoe", "version": 1, "modules": modules}))


def _load(layer, tensors: dict[str, torch.Tensor], shard_id=None):
    for suffix, t in tensors.items():
        p = getattr(layer, suffix)
        if shard_id is None:
            p.weight_loader(p, t)
        else:
            p.weight_loader(p, t, shard_id)


def _check(layer, ref_w: torch.Tensor, dtype=torch.float32):
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, ref_w.shape[1])
    out = layer(x.to(dtype))
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out.float(), F.linear(x.to(dtype).float(), ref_w), **GEMM[dtype])


def test_qkv_parallel_linear(vllm_cpu):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import QKVParallelLinear
    from mxserve.vllm_plugin.linear_method import MxLinearMethod
    name = "int4_g32_asym"
    cfg = _cfg({f"{PFX}.self_attn.{p}": name for p in ("q_proj", "k_proj", "v_proj")})
    with set_current_vllm_config(vllm_cpu):
        layer = QKVParallelLinear(H, 32, 4, 2, bias=False, quant_config=cfg, prefix=f"{PFX}.self_attn.qkv_proj",
                                  params_dtype=torch.float32)
    assert isinstance(layer.quant_method, MxLinearMethod)
    s = WeightScheme.parse(name)
    ws = {"q": torch.randn(128, H), "k": torch.randn(64, H), "v": torch.randn(64, H)}
    for sid, w in ws.items():
        _load(layer, quantize_rtn(w, s), sid)
    ref = torch.cat([dequantize(s, quantize_rtn(w, s), H) for w in ws.values()])
    _check(layer, ref)


@pytest.mark.parametrize("name", ["int8_g64_sym", "int2_g32_asym_nested3", "int3_g32_asym", "int4_g128_sym_fp16"])
def test_merged_column_parallel_linear(vllm_cpu, name):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear
    cfg = _cfg({f"{PFX}.mlp.shared_expert.{p}": name for p in ("gate_proj", "up_proj")})
    with set_current_vllm_config(vllm_cpu):
        layer = MergedColumnParallelLinear(H, [96, 96], bias=False, quant_config=cfg,
                                           prefix=f"{PFX}.mlp.shared_expert.gate_up_proj", params_dtype=torch.float32)
    s = WeightScheme.parse(name)
    ws = [torch.randn(96, H), torch.randn(96, H)]
    for i, w in enumerate(ws):
        _load(layer, quantize_rtn(w, s), i)
    _check(layer, torch.cat([dequantize(s, quantize_rtn(w, s), H) for w in ws]))


@pytest.mark.parametrize("cls", ["RowParallelLinear", "ColumnParallelLinear", "ReplicatedLinear"])
def test_single_linears_bf16_activations(vllm_cpu, cls):
    import vllm.model_executor.layers.linear as L
    from vllm.config import set_current_vllm_config
    name = "int2_g32_asym_nested4"
    cfg = _cfg({f"{PFX}.self_attn.o_proj": name})
    with set_current_vllm_config(vllm_cpu):
        layer = getattr(L, cls)(H, 64, bias=False, quant_config=cfg, prefix=f"{PFX}.self_attn.o_proj",
                                params_dtype=torch.bfloat16)
    s = WeightScheme.parse(name)
    t = quantize_rtn(torch.randn(64, H), s)
    _load(layer, t)
    _check(layer, dequantize(s, t, H), dtype=torch.bfloat16)


def test_router_and_bf16_default_stay_unquantized(vllm_cpu):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    cfg = MxMoEQuantConfig(MxMoEConfig.from_dict({"quant_method": "mxmoe", "version": 1,
                                                  "default_scheme": "int4_g32_asym"}))
    with set_current_vllm_config(vllm_cpu):
        gate = ReplicatedLinear(H, 8, bias=False, quant_config=cfg, prefix=f"{PFX}.mlp.gate")
        emb = VocabParallelEmbedding(64, H, quant_config=cfg, prefix="model.embed_tokens")
    assert isinstance(gate.quant_method, UnquantizedLinearMethod)
    assert isinstance(emb.quant_method, UnquantizedEmbeddingMethod)  # vLLM's, plus weight metrics


def test_fused_shards_with_different_schemes_error(vllm_cpu):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import QKVParallelLinear
    from mxserve.vllm_plugin.quant_config import FusedSchemeError
    cfg = _cfg({f"{PFX}.self_attn.q_proj": "int4_g32_asym", f"{PFX}.self_attn.k_proj": "int8_g32_asym",
                f"{PFX}.self_attn.v_proj": "int4_g32_asym"})
    with set_current_vllm_config(vllm_cpu), pytest.raises(FusedSchemeError, match="k_proj=int8_g32_asym"):
        QKVParallelLinear(H, 32, 4, 2, bias=False, quant_config=cfg, prefix=f"{PFX}.self_attn.qkv_proj")


def test_missing_shard_is_named(vllm_cpu):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import QKVParallelLinear
    from mxserve.vllm_plugin.loading import MissingTensorError
    name = "int4_g32_asym"
    cfg = _cfg({f"{PFX}.self_attn.{p}": name for p in ("q_proj", "k_proj", "v_proj")})
    with set_current_vllm_config(vllm_cpu):
        layer = QKVParallelLinear(H, 32, 4, 2, bias=False, quant_config=cfg, prefix=f"{PFX}.self_attn.qkv_proj",
                                  params_dtype=torch.float32)
    s = WeightScheme.parse(name)
    _load(layer, quantize_rtn(torch.randn(128, H), s), "q")
    t = quantize_rtn(torch.randn(64, H), s)
    del t["zeros"]
    _load(layer, t, "k")
    with pytest.raises(MissingTensorError, match=r"k_proj\.zeros.*v_proj\.qweight"):
        layer.quant_method.process_weights_after_loading(layer)


def test_wrong_dtype_is_named(vllm_cpu):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear
    from mxserve.vllm_plugin.loading import UnexpectedTensorError
    cfg = _cfg({f"{PFX}.self_attn.o_proj": "int4_g32_asym"})
    with set_current_vllm_config(vllm_cpu):
        layer = RowParallelLinear(H, 64, bias=False, quant_config=cfg, prefix=f"{PFX}.self_attn.o_proj")
    t = quantize_rtn(torch.randn(64, H), WeightScheme.parse("int4_g32_asym"))
    with pytest.raises(UnexpectedTensorError, match=r"o_proj\.scales"):
        layer.scales.weight_loader(layer.scales, t["scales"].half())


def test_group_size_must_divide_rank_k():
    from mxserve.vllm_plugin.linear_method import check_divisible
    with pytest.raises(ValueError, match=r"group size 128.*K/tp = 384/2 = 192"):
        check_divisible(WeightScheme.parse("int4_g128_asym"), 192, 2, "o_proj")
    check_divisible(WeightScheme.parse("int4_g64_asym"), 192, 2, "o_proj")
