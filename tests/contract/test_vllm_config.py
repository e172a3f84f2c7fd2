"""Contract: the ``mxmoe`` QuantizationConfig as vLLM sees it (registration, parsing, dispatch, checkpoint check)."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from mxserve.config import MxMoEConfig
from mxserve_kernels.formats import WeightScheme
from tests.contract.rtn import quantize_rtn

PLAN = {"quant_method": "mxmoe", "version": 1, "default_scheme": "bf16",
        "modules": {"model.layers.0.self_attn.o_proj": "int4_g32_asym"},
        "experts": {"model.layers.0.mlp.experts": {"gate_up": ["int4_g32_asym", "bf16"],
                                                   "down": ["int8_g32_sym", "int2_g32_asym_nested4"]}}}


def test_registered_and_picklable(vllm_cpu):
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    import mxserve.vllm_plugin.quant_config as qc
    assert "mxmoe" in QUANTIZATION_METHODS and get_quantization_config("mxmoe") is qc.MxMoEQuantConfig
    cfg = qc.MxMoEQuantConfig.from_config(PLAN)
    again = pickle.loads(pickle.dumps(cfg))
    assert again.cfg == cfg.cfg and again.get_name() == "mxmoe"
    assert qc.MxMoEQuantConfig.override_quantization_method(PLAN, None) == "mxmoe"
    assert qc.MxMoEQuantConfig.override_quantization_method({"quant_method": "gptq"}, "mxmoe") is None
    assert qc.MxMoEQuantConfig.from_config_dict_json('{"quant_method": "mxmoe", "version": 1}').cfg == MxMoEConfig()


def test_fused_lookup_and_mapper(vllm_cpu):
    from vllm.model_executor.models.utils import WeightsMapper
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    plan = dict(PLAN, modules={f"model.layers.0.self_attn.{p}": "int8_g64_asym" for p in ("q_proj", "k_proj", "v_proj")})
    cfg = MxMoEQuantConfig.from_config(plan)
    assert cfg.linear_scheme("model.layers.0.self_attn.qkv_proj") == WeightScheme.parse("int8_g64_asym")
    assert cfg.linear_scheme("model.layers.0.mlp.gate").bits == 16
    cfg.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))
    cfg.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))  # idempotent
    assert cfg.linear_scheme("language_model.model.layers.0.self_attn.qkv_proj").bits == 8
    assert cfg.expert_plan("language_model.model.layers.0.mlp.experts") is not None


def _write_ckpt(tmp_path, drop=(), extra=None):
    t = {}
    for suf, v in quantize_rtn(torch.randn(64, 64), WeightScheme.parse("int4_g32_asym")).items():
        t[f"model.layers.0.self_attn.o_proj.{suf}"] = v
    for e, (gu, dn) in enumerate(zip(PLAN["experts"]["model.layers.0.mlp.experts"]["gate_up"],
                                     PLAN["experts"]["model.layers.0.mlp.experts"]["down"])):
        for proj, s in (("gate_proj", gu), ("up_proj", gu), ("down_proj", dn)):
            for suf, v in quantize_rtn(torch.randn(64, 64), WeightScheme.parse(s)).items():
                t[f"model.layers.0.mlp.experts.{e}.{proj}.{suf}"] = v
    t["model.embed_tokens.weight"] = torch.zeros(4, 64)
    for k in drop:
        del t[k]
    t.update(extra or {})
    save_file({k: v.contiguous() for k, v in t.items()}, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


def test_check_checkpoint(tmp_path):
    from mxserve.vllm_plugin.loading import MissingTensorError, UnexpectedTensorError, check_checkpoint
    cfg = MxMoEConfig.from_dict(PLAN)
    hf = {"model_type": "qwen3_moe"}
    check_checkpoint(cfg, _write_ckpt(tmp_path), hf)
    with pytest.raises(MissingTensorError, match=r"experts\.1\.down_proj\.plane4_scales"):
        check_checkpoint(cfg, _write_ckpt(tmp_path, drop=["model.layers.0.mlp.experts.1.down_proj.plane4_scales"]), hf)
    with pytest.raises(UnexpectedTensorError, match=r"experts\.0\.down_proj\.zeros"):
        check_checkpoint(cfg, _write_ckpt(tmp_path, extra={
            "model.layers.0.mlp.experts.0.down_proj.zeros": torch.zeros(2, 2)}), hf)
    with pytest.raises(UnexpectedTensorError, match=r"q_proj\.qweight"):
        check_checkpoint(cfg, _write_ckpt(tmp_path, extra={
            "model.layers.0.self_attn.q_proj.qweight": torch.zeros(2, 2, dtype=torch.uint8)}), hf)
    with pytest.raises(UnexpectedTensorError, match=r"experts\.2\.gate_proj\.weight"):
        check_checkpoint(cfg, _write_ckpt(tmp_path, extra={
            "model.layers.0.mlp.experts.2.gate_proj.weight": torch.zeros(2, 2)}), hf)
