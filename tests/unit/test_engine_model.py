"""The embedded engine's pure-torch forward vs transformers' implementation of the same checkpoint (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from mxserve.engine.kv_cache import KVCache, make_cache_factory
from mxserve.engine.model import MoEModel
from tests.tolerances import GEMM

TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=False)


def _hf_model(arch: str):
    import transformers as tf
    if arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**TINY, head_dim=16, intermediate_size=48, moe_intermediate_size=32, num_experts=6,
                                num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])
        return tf.Qwen3MoeForCausalLM(cfg)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(**TINY, intermediate_size=32, num_local_experts=6, num_experts_per_tok=2)
        return tf.MixtralForCausalLM(cfg)
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**TINY, intermediate_size=48, moe_intermediate_size=32, num_experts=6,
                                num_experts_per_tok=2, shared_expert_intermediate_size=40, norm_topk_prob=False)
        return tf.Qwen2MoeForCausalLM(cfg)
    cfg = tf.OlmoeConfig(**TINY, intermediate_size=32, num_experts=6, num_experts_per_tok=2, clip_qkv=2.5)
    return tf.OlmoeForCausalLM(cfg)


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "qwen2_moe", "olmoe"])
def saved(request, tmp_path_factory):
    torch.manual_seed(1)
    m = _hf_model(request.param).float().eval()
    with torch.no_grad():
        for p in m.parameters():  # HF init leaves routers/norms degenerate; randomise everything
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    d = tmp_path_factory.mktemp(request.param)
    m.save_pretrained(d)
    return m, d


def _fp32_cache(model: MoEModel) -> KVCache:
    return model.new_cache(make_cache_factory("fp32"))


def test_prefill_logits_match_transformers(saved):
    hf, d = saved
    model = MoEModel.load(d)
    ids = torch.randint(0, hf.config.vocab_size, (11,))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    hidden = model.forward(ids, torch.arange(11), [(0, 11)], [_fp32_cache(model)], all_tokens=True)
    torch.testing.assert_close(model.logits(hidden), ref, **GEMM[torch.float32])


def test_batched_chunked_decode_matches_full_prefill(saved):
    """Two sequences in one flat batch, prefill in chunks then decode one token at a time == one-shot prefill."""
    hf, d = saved
    model = MoEModel.load(d)
    a, b = torch.randint(0, 96, (9,)), torch.randint(0, 96, (6,))
    with torch.no_grad():
        ref_a, ref_b = hf(a[None]).logits[0, -1], hf(b[None]).logits[0, -1]
    ca, cb = _fp32_cache(model), _fp32_cache(model)
    model.forward(torch.cat([a[:4], b[:5]]), torch.cat([torch.arange(4), torch.arange(5)]), [(0, 4), (4, 9)], [ca, cb])
    model.forward(a[4:8], torch.arange(4, 8), [(0, 4)], [ca])
    h = model.forward(torch.stack([a[8], b[5]]), torch.tensor([8, 5]), [(0, 1), (1, 2)], [ca, cb])
    out = model.logits(h)
    torch.testing.assert_close(out[0], ref_a.float(), **GEMM[torch.float32])
    torch.testing.assert_close(out[1], ref_b.float(), **GEMM[torch.float32])
    assert len(ca) == 9 and len(cb) == 6
