"""OffloadConfig validation / round trip and PlaneLayout byte accounting against mxserve_kernels.formats."""
from __future__ import annotations

import json

import pytest

from mxserve.scheduler.config import GIB, OffloadConfig, OffloadConfigError
from mxserve.scheduler.layout import ALIGN, BASE, LEVELS, UPPER, PlaneLayout, qwen3_30b_a3b_layout
from mxserve_kernels.formats import WeightScheme, tensor_names


def test_roundtrip_json():
    cfg = OffloadConfig(gpu_budget_fraction=0.25, policy="lru", lookahead=2, on_miss="wait", max_stall_us=5.0)
    again = OffloadConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_none_section_means_disabled():
    cfg = OffloadConfig.from_dict(None)
    assert not cfg.enabled and cfg.budget_bytes(1000) == 1000


@pytest.mark.parametrize("bad, field", [
    ({"gpu_budget_gib": 1.0, "gpu_budget_fraction": 0.5}, "gpu_budget_gib"),
    ({"gpu_budget_fraction": 1.5}, "gpu_budget_fraction"),
    ({"gpu_budget_fraction": 0}, "gpu_budget_fraction"),
    ({"gpu_budget_gib": -1}, "gpu_budget_gib"),
    ({"policy": "fifo"}, "policy"),
    ({"lookahead": -1}, "lookahead"),
    ({"lookahead": True}, "lookahead"),
    ({"on_miss": "skip"}, "on_miss"),
    ({"base_keep_weight": 0.5}, "base_keep_weight"),
    ({"hot_decay": 1.0}, "hot_decay"),
    ({"h2d_gbps": 0}, "h2d_gbps"),
    ({"version": 2}, "version"),
])
def test_validation_names_field(bad, field):
    with pytest.raises(OffloadConfigError, match=rf"offload\.{field}"):
        OffloadConfig.from_dict({"version": 1, **bad})


def test_unknown_and_missing_fields():
    with pytest.raises(OffloadConfigError, match="unknown field"):
        OffloadConfig.from_dict({"version": 1, "budget": 3})
    with pytest.raises(OffloadConfigError, match="version: missing"):
        OffloadConfig.from_dict({"policy": "hebf"})
    with pytest.raises(OffloadConfigError, match="expected an object"):
        OffloadConfig.from_dict([1])


def test_budget_bytes():
    total = 10 * GIB
    assert OffloadConfig().budget_bytes(total) == total
    assert OffloadConfig(gpu_budget_fraction=0.25).budget_bytes(total) == total // 4
    assert OffloadConfig(gpu_budget_gib=3).budget_bytes(total) == 3 * GIB
    assert OffloadConfig(gpu_budget_gib=30).budget_bytes(total) == total   # capped at what exists
    assert not OffloadConfig(policy="none").prefetch and not OffloadConfig(lookahead=0).prefetch


@pytest.mark.parametrize("g", [32, 64, 128])
def test_layout_matches_format_sizes(g):
    s = WeightScheme(bits=4, group_size=g, nested=True)
    h, i = 512, 256
    lay = PlaneLayout(hidden=h, inter=i, gate_up=s, down=s)
    # every checkpoint tensor of both projections appears exactly once, in the plane its name belongs to
    names = sorted(sp.name for lv in LEVELS for sp in lay.specs[lv])
    assert names == sorted(f"{p}.{t}" for p in ("gate_up", "down") for t in tensor_names(s))
    for lv in LEVELS:
        spans = sorted((sp.offset, sp.offset + sp.nbytes) for sp in lay.specs[lv])
        assert all(sp.offset % ALIGN == 0 for sp in lay.specs[lv] if not sp.name.endswith(".zeros"))
        for sp in lay.specs[lv]:   # the kernel reads meta [2, K/G, N]: zeros directly after scales
            if sp.name.endswith(".zeros"):
                sc = lay.spec(lv, sp.name.replace(".zeros", ".scales"))
                assert sp.offset == sc.offset + sc.nbytes
            assert sp.kernel_shape[0] * sp.kernel_shape[1] * (4 if sp.kernel_dtype == "int32" else 2) == sp.nbytes
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(spans, spans[1:])), "tensors overlap"
        assert spans[-1][1] <= lay.plane_bytes[lv]
    # unaligned payload equals the format's exact storage for the int4-prefix (all planes) scheme
    payload = sum(sp.nbytes for lv in LEVELS for sp in lay.specs[lv])
    assert payload == s.storage_bytes(2 * i, h) + s.storage_bytes(h, i)
    # a base is as large as planes 3 + 4 up to alignment (shared slot size)
    assert lay.slot_bytes == sum(lay.plane_bytes[p] for p in UPPER) >= lay.plane_bytes[BASE]
    assert lay.slot_bytes - lay.plane_bytes[BASE] < 4 * ALIGN
    assert lay.slot_offset(BASE) == lay.slot_offset(3) == 0 and lay.slot_offset(4) == lay.plane_bytes[3]


def test_layout_rejects_non_nested_and_bad_shapes():
    with pytest.raises(ValueError, match="gate_up scheme 'int4_g128_asym' is not nested"):
        PlaneLayout(hidden=256, inter=128, gate_up=WeightScheme(bits=4), down=WeightScheme(bits=4))
    s = WeightScheme(bits=4, group_size=128, nested=True)
    with pytest.raises(ValueError, match="offload layout down"):
        PlaneLayout(hidden=256, inter=96, gate_up=WeightScheme(bits=4, group_size=32, nested=True), down=s)


def test_qwen3_geometry_bytes():
    lay, geo = qwen3_30b_a3b_layout()
    per_expert = 3 * geo["hidden"] * geo["inter"]
    assert lay.expert_bytes * 8 == pytest.approx(per_expert * WeightScheme.parse("int2_g128_asym_nested4").bits_per_weight)
