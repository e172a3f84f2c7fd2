"""A real vLLM 0.26 ``Attention`` layer built with the mxmoe quant config holding a KV-only plan (CPU platform):
``_init_kv_cache_quant`` -> ``MxKVCacheMethod.create_weights`` must install our backend / impl, the layer's spec must
carry the packed page (what "GPU KV cache size" is computed from), and weight post-processing must keep them."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


def _kv_plan(num_layers: int, head_dim: int) -> dict:
    from mxserve.config.quant_config import MxMoEConfig
    from mxserve.kvcache.config import KVQuantConfig
    qc = MxMoEConfig().to_dict()
    qc["kv"] = KVQuantConfig.uniform(num_layers, 2, 1.5, 64, 128).to_dict()
    return qc


def _attention(cfg, quant_config, layer: int, head_dim: int = 128):
    from vllm.config import CacheConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    # the stock backend vLLM would pick on GPU is replaced by create_weights (CPU_ATTN's impl needs a model config)
    with set_current_vllm_config(cfg):
        return Attention(4, head_dim, head_dim ** -0.5, num_kv_heads=2, cache_config=CacheConfig(),
                         quant_config=quant_config, prefix=f"model.layers.{layer}.self_attn.attn",
                         attn_backend=TritonAttentionBackend)


def test_attention_layer_gets_packed_backend_and_spec(vllm_cpu):
    from vllm.config import set_current_vllm_config

    from mxserve.vllm_plugin.kv.backend import MxKVBackend, MxKVImpl, MxKVSpec
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    from mxserve_kernels.attention.kv_format import KVSlotFormat
    qcfg = MxMoEQuantConfig.from_config(_kv_plan(2, 128))
    layer = _attention(vllm_cpu, qcfg, 1)
    assert isinstance(layer.impl, MxKVImpl) and layer.attn_backend is MxKVBackend
    assert layer.get_attn_backend() is MxKVBackend and layer.backend.name == "CUSTOM"
    assert not layer.attn_backend.forward_includes_kv_cache_update  # Attention.forward runs do_kv_cache_update
    slot = KVSlotFormat(128, k_bits=2, v_bits=1.5, k_group=64, v_group=128).slot_bytes
    with set_current_vllm_config(vllm_cpu):
        spec = layer.get_kv_cache_spec(vllm_cpu)
    bs = vllm_cpu.cache_config.block_size
    assert isinstance(spec, MxKVSpec) and spec.dtype == torch.uint8 and spec.slot_bytes == slot
    assert spec.page_size_bytes == bs * 2 * slot
    assert (bs * 2 * 2 * 128 * 2) / spec.page_size_bytes >= 7.0  # vs the bf16 page of the same layer
    shape = layer.attn_backend.get_kv_cache_shape(3, bs, spec.num_kv_heads, spec.head_size)
    assert shape == (3, bs, 2, slot)
    # the model loader calls the quant method's hook, then the layer's (vllm model_loader/utils.py)
    layer.quant_method.process_weights_after_loading(layer)
    layer.process_weights_after_loading(torch.bfloat16)
    assert isinstance(layer.impl, MxKVImpl) and layer.impl.fmt.slot_bytes == slot
    assert layer.impl.kv_quant_mode.name == "NONE"


def test_plan_without_kv_keeps_vllm_attention(vllm_cpu):
    from mxserve.config.quant_config import MxMoEConfig
    from mxserve.vllm_plugin.kv.backend import MxKVImpl
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    layer = _attention(vllm_cpu, MxMoEQuantConfig.from_config(MxMoEConfig().to_dict()), 0)
    assert not isinstance(layer.impl, MxKVImpl)


def test_layer_outside_plan_is_one_clear_error(vllm_cpu):
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    qcfg = MxMoEQuantConfig.from_config(_kv_plan(2, 128))
    with pytest.raises(ValueError, match="no entry for layer 5"):
        _attention(vllm_cpu, qcfg, 5)


def test_builder_splits_decodes_and_keeps_prefill_lengths(vllm_cpu):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from mxserve.vllm_plugin.kv.backend import MxKVMetadataBuilder, MxKVSpec
    spec = MxKVSpec(block_size=16, num_kv_heads=2, head_size=70, dtype=torch.uint8, slot_bytes=70)
    b = MxKVMetadataBuilder(spec, ["l0"], vllm_cpu, torch.device("cpu"))
    assert b.reorder_batch_threshold == 1
    # 2 decodes (1 token each) then a 5-token prefill continuing 3 cached tokens
    qsl = torch.tensor([0, 1, 2, 7], dtype=torch.int32)
    seq = torch.tensor([9, 4, 8], dtype=torch.int32)
    for upper in (seq.clone(), None):  # the V2 runner may leave seq_lens_cpu_upper_bound unset
        cam = CommonAttentionMetadata(query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq, num_reqs=3,
                                      num_actual_tokens=7, max_query_len=5, max_seq_len=9,
                                      block_table_tensor=torch.zeros(3, 4, dtype=torch.int32),
                                      slot_mapping=torch.arange(7), seq_lens_cpu_upper_bound=upper)
        md = b.build(0, cam)
        assert (md.num_decodes, md.num_decode_tokens, md.num_actual_tokens) == (2, 2, 7)
        assert md.seq_lens_cpu.tolist() == [9, 4, 8]
