"""Output-KL layer probe: zero-free, ordered by probe precision, one entry per MoE layer."""
from __future__ import annotations

import torch

from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.quant.layer_kld import layer_kld_probe
from mxserve_kernels.formats import WeightScheme


def test_probe_kl_positive_per_layer_and_smaller_at_more_bits(tmp_path):
    from mxserve.models.tiny import make_tiny
    src = make_tiny("qwen3_moe", tmp_path / "src", layers=2, experts=4, top_k=2, hidden=64, inter=64, vocab=512,
                    heads=2, kv_heads=1, head_dim=32)
    ck = HFCheckpoint(src)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    k1 = layer_kld_probe(ck, ids, "cpu", WeightScheme(1, 32))
    k8 = layer_kld_probe(ck, ids, "cpu", WeightScheme(8, 32))
    assert sorted(k1) == [0, 1] and all(v > 0 for v in k1.values())
    assert all(k8[l] < k1[l] for l in k1)
