"""Contract: the mxmoe config hands vLLM ``Attention`` layers to the KV package's ``MxKVCacheMethod`` exactly when the
plan has a ``kv`` section, and a bad ``kv`` section fails at parse time (process 0) naming the field."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mxserve.kvcache.config import KVConfigError, KVQuantConfig

HEAD_DIM = 128


def _kv_dict() -> dict:
    """Two layers with different K bits (so the shared slot is the larger layer's)."""
    d = KVQuantConfig.uniform(2, 2, 1.5, 64, 128).to_dict()
    d["layers"][1]["k_bits"] = 4
    return d


@pytest.fixture(scope="module")
def attn_config(vllm_cpu, tmp_path_factory):
    """The CPU VllmConfig with a real ModelConfig (Attention reads dtype / mm flags from it)."""
    from vllm.config import ModelConfig

    from mxserve.models.tiny import build_config, tiny_config_kwargs
    d = tmp_path_factory.mktemp("attn_model")
    build_config("qwen3_moe", tiny_config_kwargs("qwen3_moe", layers=2, experts=4, top_k=2, hidden=256, inter=128,
                                                 vocab=512, heads=4, kv_heads=2, head_dim=HEAD_DIM)).save_pretrained(d)
    vc = copy.copy(vllm_cpu)
    object.__setattr__(vc, "model_config", ModelConfig(model=str(d), skip_tokenizer_init=True, dtype="bfloat16"))
    return vc


def _attention(vc, quant_config, layer: int):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention
    with set_current_vllm_config(vc):
        return Attention(4, HEAD_DIM, HEAD_DIM ** -0.5, 2, quant_config=quant_config,
                         prefix=f"model.layers.{layer}.self_attn.attn")


def test_attention_gets_kv_method_when_plan_has_kv(attn_config):
    from mxserve.vllm_plugin.kv.backend import MxKVBackend, MxKVImpl
    from mxserve.vllm_plugin.kv.method import MxKVCacheMethod, shared_slot_bytes
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    kv = _kv_dict()
    cfg = MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1, "kv": kv})
    expected = KVQuantConfig.from_dict(kv)
    assert cfg.kv_cfg == expected  # parsed once, at from_config
    cfg = pickle.loads(pickle.dumps(cfg))  # what the workers receive
    layer = _attention(attn_config, cfg, layer=0)
    assert isinstance(layer.quant_method, MxKVCacheMethod)
    assert layer.quant_method.kv == expected and layer.quant_method.prefix == "model.layers.0.self_attn.attn"
    assert isinstance(layer.impl, MxKVImpl) and layer.attn_backend is MxKVBackend
    spec = layer.get_kv_cache_spec(attn_config)
    slot = shared_slot_bytes(expected, HEAD_DIM)
    assert slot == max(lc.slot_format(HEAD_DIM).slot_bytes for lc in expected.layers)
    assert slot > expected.layers[0].slot_format(HEAD_DIM).slot_bytes  # layer 1 (4-bit K) sets the shared slot
    assert spec.slot_bytes == slot and spec.num_kv_heads == 2


def test_attention_untouched_without_kv(attn_config):
    from mxserve.vllm_plugin.kv.backend import MxKVImpl
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    cfg = MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1})
    assert cfg.kv_cfg is None
    layer = _attention(attn_config, cfg, layer=1)
    assert getattr(layer, "quant_method", None) is None and not isinstance(layer.impl, MxKVImpl)
    assert cfg.get_quant_method(torch.nn.Linear(2, 2), "model.layers.1.self_attn.attn") is None


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["layers"][0].pop("k_bits"), r"missing \['k_bits'\]"),
    (lambda d: d.update(version=99), r"kv\.version"),
    (lambda d: d.update(bogus=1), r"kv: unknown field"),
])
def test_bad_kv_fails_at_parse_time(vllm_cpu, mutate, match):
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    kv = _kv_dict()
    mutate(kv)
    with pytest.raises(KVConfigError, match=match):
        MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1, "kv": kv})


def test_kv_checked_against_the_model_before_loading(vllm_cpu):
    from mxserve.models.tiny import build_config, tiny_config_kwargs
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig, kv_geometry
    hf = build_config("qwen3_moe", tiny_config_kwargs("qwen3_moe", layers=2, experts=4, top_k=2, hidden=256,
                                                       inter=128, vocab=512, heads=4, kv_heads=2, head_dim=HEAD_DIM))
    assert kv_geometry(hf) == (2, 2, HEAD_DIM) and kv_geometry(hf.to_dict()) == (2, 2, HEAD_DIM)
    MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1, "kv": _kv_dict()}).maybe_update_config(
        "", hf)
    three = _kv_dict()
    three["layers"].append(dict(three["layers"][0]))
    cfg = MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1, "kv": three})
    with pytest.raises(KVConfigError, match="3 entries, model has 2"):
        cfg.maybe_update_config("", hf)
