"""KV calibration: config schema, bit accounting, channel order, clip search, exact per-layer bit search, CLI."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from mxserve.kvcache.bits import bits_table, default_format, effective_bits, model_bits
from mxserve.kvcache.calibrate import (Candidate, attention_error, calibrate_layer, channel_order, pareto,
                                       search_bits)
from mxserve.kvcache.config import KVConfigError, KVLayerConfig, KVQuantConfig


def test_config_roundtrip_and_errors():
    perm = tuple(tuple(torch.randperm(8).tolist()) for _ in range(2))
    cfg = KVQuantConfig(layers=(KVLayerConfig(2, 1.5, 4, 8, 0.9, 1.0, perm, None), KVLayerConfig(4, 4, 8, 8)),
                        meta={"x": 1})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert KVQuantConfig.from_dict(d) == cfg
    cfg.validate_model(2, 2, 8)
    with pytest.raises(KVConfigError, match=r"layers\[0\].k_bits"):
        KVQuantConfig.from_dict(dict(d, layers=[dict(d["layers"][0], k_bits=3)]))
    with pytest.raises(KVConfigError, match=r"layers\[0\].k_perm\[0\]"):
        KVQuantConfig.from_dict(dict(d, layers=[dict(d["layers"][0], k_perm=[[0, 0, 1, 2, 3, 4, 5, 6]] * 2)]))
    with pytest.raises(KVConfigError, match="unknown"):
        KVQuantConfig.from_dict(dict(d, bogus=1))
    with pytest.raises(KVConfigError, match="version"):
        KVQuantConfig.from_dict(dict(d, version=2))
    with pytest.raises(KVConfigError, match="3 entries, model has"):
        KVQuantConfig.from_dict(dict(d, layers=d["layers"] + [d["layers"][1]])).validate_model(2, 2, 8)


def test_bits_accounting():
    f = default_format("K2V1.5", 128)
    # codes: K 2 bit, V 8/5 bit; meta: fp16 scale+zero per group (K g64, V g128) -> per element over K and V
    expect = (2 + 1.6 + 32 / 64 + 32 / 128) / 2
    assert f.bits_per_element() == pytest.approx(expect, abs=8 / 256)  # slot rounding to 2 bytes
    assert f.compression_vs(2) >= 7.0
    assert effective_bits(f, 8192, 4, 128) == pytest.approx(f.bits_per_element() + 132 / 8192 * 16)
    assert effective_bits(f, 100, 4, 128) == pytest.approx(f.bits_per_element() + 16)  # all tokens in fp zones
    rows = bits_table(["K2V1.5", "K4V2", "K4V4"], 128, [8192, 32768])
    assert [r["config"] for r in rows] == ["K2V1.5", "K4V2", "K4V4"]
    assert rows[0]["packed_bits"] < rows[1]["packed_bits"] < rows[2]["packed_bits"]
    cfg = KVQuantConfig.uniform(3, 2, 1.5, 64, 128)
    assert model_bits(cfg, 128) == pytest.approx(f.bits_per_element())


def _outlier_data(n=96, h=2, d=32, hq=4):
    scales = torch.ones(d)
    scales[torch.randperm(d)[:4]] = 12.0  # a few outlier channels (as in real keys)
    k = torch.randn(n, h, d) * scales
    v = torch.randn(n, h, d)
    q = torch.randn(n, hq, d) * 0.3
    return q, k, v


def test_channel_order_groups_outliers_and_helps():
    q, k, v = _outlier_data()
    perm = channel_order(k)
    rng = (k.amax(0) - k.amin(0))
    assert torch.equal(torch.sort(perm, dim=-1).values, torch.arange(32).expand(2, -1).to(torch.int32))
    assert bool((torch.gather(rng, 1, perm.long())[:, :4] > 20).all())  # the outliers share the first group
    f = default_format("K2V2", 32)
    f = type(f)(32, k_bits=2, v_bits=2, k_group=8, v_group=32)
    e_plain = attention_error(q, k, v, f, 0.2)
    e_perm = attention_error(q, k, v, f, 0.2, k_perm=perm)
    assert e_perm[0] < e_plain[0]


def test_calibrate_layer_clip_and_order():
    q, k, v = _outlier_data()
    heavy = torch.distributions.StudentT(2.0).sample(v.shape)
    cands = calibrate_layer([(q, k, heavy)], 0.2, ("K4V2", "K2V1.5"), sink=2)
    assert [c.label for c in cands] == ["K4V2", "K2V1.5"]
    assert cands[0].rel_err < cands[1].rel_err and cands[0].slot_bytes > cands[1].slot_bytes
    c = cands[1]
    fmt = c.layer.slot_format(32)
    base = attention_error(q, k, heavy, fmt, 0.2, sink=2)
    assert c.rel_err <= base[0] / base[1]
    assert c.layer.v_clip < 1.0  # heavy-tailed values: clipping wins


def _brute(per_layer, budget, d):
    best = None
    for combo in itertools.product(*per_layer):
        if sum(c.slot_bytes for c in combo) * 8 / (2 * d) <= budget * len(per_layer) + 1e-9:
            e = sum(c.rel_err for c in combo)
            best = e if best is None or e < best else best
    return best


@pytest.mark.parametrize("seed", range(4))
def test_search_bits_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    d = 128
    labels = ["K8V8", "K8V4", "K4V4", "K4V2", "K2V2", "K2V1.5"]
    fmts = [default_format(lab, d) for lab in labels]
    per_layer = []
    for _ in range(5):
        errs = torch.rand(len(labels), generator=g).sort(descending=True).values.flip(0)  # pricier = better
        per_layer.append([Candidate(lab, KVLayerConfig(f.k_bits, f.v_bits, f.k_group, f.v_group), float(e),
                                    f.slot_bytes, f.bits_per_element()) for lab, f, e in zip(labels, fmts, errs)])
    for budget in (2.3, 3.0, 4.5):
        chosen = search_bits(per_layer, budget, d)
        assert sum(c.bits for c in chosen) / 5 <= budget + 1e-9
        assert sum(c.rel_err for c in chosen) == pytest.approx(_brute(per_layer, budget, d))
    with pytest.raises(ValueError, match="below the cheapest"):
        search_bits(per_layer, 1.0, d)
    front = pareto(per_layer[0])
    assert all(a.slot_bytes < b.slot_bytes and a.rel_err > b.rel_err for a, b in zip(front, front[1:]))


@pytest.mark.slow
def test_calibrate_kv_cli_on_tiny_model(tmp_path):
    from mxserve.cli.main import main
    from mxserve.models.tiny import make_tiny
    d = make_tiny("qwen3_moe", tmp_path / "m", layers=2, experts=4, top_k=2)
    assert main(["calibrate-kv", str(d), "--budget", "3.0", "--num-seqs", "1", "--seq-len", "128",
                 "--candidates", "K8V4,K4V4,K4V2,K2V1.5"]) == 0
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    kv = KVQuantConfig.from_dict(qc["kv"])
    kv.validate_model(2, 2, 32)
    assert kv.meta["avg_packed_bits"] <= 3.0 and len(kv.meta["layer_labels"]) == 2
    from mxserve.config.quant_config import MxMoEConfig
    assert MxMoEConfig.from_dict(qc).kv == qc["kv"]
