"""CPU contract of the vLLM KV backend: real page size, spec merge, cache shape, and a mixed decode+prefill step
through do_kv_cache_update + forward vs the reference (CPU launchers run the reference path)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from mxserve.kvcache.config import KVQuantConfig  # noqa: E402
from mxserve_kernels.attention import reference as R  # noqa: E402
from tests.tolerances import ATTENTION  # noqa: E402


def test_spec_page_size_and_merge():
    from mxserve.vllm_plugin.kv.backend import MxKVBackend, MxKVSpec
    from mxserve.vllm_plugin.kv.method import layer_index, shared_slot_bytes
    cfg = KVQuantConfig.uniform(2, 2, 1.5, 64, 128)
    slot = shared_slot_bytes(cfg, 128)
    assert slot == cfg.layers[0].slot_format(128).slot_bytes
    spec = MxKVSpec(block_size=16, num_kv_heads=4, head_size=slot, dtype=torch.uint8, slot_bytes=slot)
    assert spec.page_size_bytes == 16 * 4 * slot
    bf16 = 16 * 4 * 2 * 128 * 2
    assert bf16 / spec.page_size_bytes >= 7.0  # capacity vs --kv-cache-dtype auto at the same memory
    assert MxKVSpec.merge([spec, spec]).slot_bytes == slot
    with pytest.raises(ValueError, match="slot sizes differ"):
        MxKVSpec.merge([spec, MxKVSpec(block_size=16, num_kv_heads=4, head_size=slot, dtype=torch.uint8,
                                       slot_bytes=slot + 2)])
    assert MxKVBackend.get_kv_cache_shape(10, 16, 4, slot) == (10, 16, 4, slot)
    assert MxKVBackend.get_name() == "CUSTOM"
    assert layer_index("model.layers.7.self_attn.attn") == 7


def test_impl_mixed_decode_prefill_step():
    from mxserve.vllm_plugin.kv.backend import MxKVImpl, MxKVMetadata
    d, h, hq, p = 32, 2, 4, 4
    lc = KVQuantConfig.uniform(1, 2, 1.5, 16, 32).layers[0]
    fmt = lc.slot_format(d)
    impl = MxKVImpl(hq, d, 0.2, h)
    kp = torch.stack([torch.randperm(d) for _ in range(h)]).to(torch.int32)
    impl.bind(fmt, kp, None, 0.95, 1.0)
    cache = torch.zeros(12, p, h, fmt.slot_bytes + 4, dtype=torch.uint8)  # shared slot larger than this layer's
    table = torch.tensor([[3, 7, 1], [0, 5, 9]], dtype=torch.int32)
    # request 0: 6 tokens cached, decodes its 7th; request 1: 2 cached, prefills 3 more
    hist_k, hist_v = [torch.randn(6, h, d), torch.randn(2, h, d)], [torch.randn(6, h, d), torch.randn(2, h, d)]
    for i, hk in enumerate(hist_k):
        pos = torch.arange(hk.shape[0])
        impl.do_kv_cache_update(None, hk.reshape(-1, h * d), hist_v[i].reshape(-1, h * d), cache,
                                table[i][pos // p].long() * p + pos % p)
    n = 4
    q, k, v = torch.randn(n, hq * d), torch.randn(n, h * d), torch.randn(n, h * d)
    slots = torch.tensor([table[0][1] * p + 2, table[1][0] * p + 2, table[1][0] * p + 3, table[1][1] * p + 0])
    impl.do_kv_cache_update(None, k, v, cache, slots)
    md = MxKVMetadata(seq_lens=torch.tensor([7, 5]), block_table=table, query_start_loc=torch.tensor([0, 1, 4]),
                      num_actual_tokens=n, num_decodes=1, num_decode_tokens=1,
                      query_start_loc_cpu=torch.tensor([0, 1, 4]), seq_lens_cpu=torch.tensor([7, 5]))
    out = impl.forward(None, q, k, v, cache, md).view(n, hq, d)
    c = cache[..., : fmt.slot_bytes]
    qv, kv_, vv = q.view(n, hq, d), k.view(n, h, d), v.view(n, h, d)
    dec = R.paged_decode_attention(qv[:1], c, table[:1], torch.tensor([0]), torch.tensor([6]), kv_[:1, None],
                                   vv[:1, None], torch.tensor([1]), fmt, 0.2, kp, None)
    pre = R.paged_prefill_attention(qv[1:], kv_[1:], vv[1:], torch.tensor([0, 3]), torch.tensor([2]), c, table[1:],
                                    fmt, 0.2, kp, None)
    torch.testing.assert_close(out[:1], dec, **ATTENTION[torch.float32])
    torch.testing.assert_close(out[1:], pre, **ATTENTION[torch.float32])
    # the past-only decode differs from reading the current token back quantized
    quant_cur = R.paged_decode_attention(qv[:1], c, table[:1], torch.tensor([0]), torch.tensor([7]),
                                         kv_[:1, None], vv[:1, None], torch.tensor([0]), fmt, 0.2, kp, None)
    assert not torch.allclose(out[:1], quant_cur)
