"""``tune_moe`` plumbing on CPU with the GPU timing stubbed: --kinds parsing, per-width grouping (w2 and mix25 share
by_bits["2"] and are tuned jointly), the merged file, and that the written entry is what ``moe_config`` returns."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from mxserve_kernels._common import configs
from mxserve_kernels.moe import moe_config

tm = importlib.import_module("mxserve_kernels.bench.tune_moe")
SHAPE = dict(E=4, H=128, I=128, K=2)
KEY = {"E": 4, "H": 128, "I": 128}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setitem(tm.SHAPES, "tiny", SHAPE)
    monkeypatch.setattr(configs, "CONFIG_DIR", str(tmp_path))
    configs._load.cache_clear()
    yield tmp_path
    configs._load.cache_clear()


def _layer(pw) -> str:
    return {4: "w4", 2: "mix25" if pw.kinds_mask & 8 else "w2"}[configs.projection_bits(pw)]


def _stub_measure(fast: list, calls: list):
    """Fake timings: ``fast`` = [(layer, cfg, us)] (both projections alike), 30 us for every other config."""
    def measure(cfgs, w13, w2, x, hmid, tw, ids, e, k, rep):
        layer = _layer(w13)
        calls.append(layer)
        out = {"w13": [], "w2": []}
        for cfg in cfgs:
            us = 30.0
            for lay, target, t in fast:
                if lay == layer and cfg == target:
                    us = t
            for p in out:
                out[p].append((us, cfg))
        return out
    return measure


def test_parse_kinds():
    assert tm.parse_kinds("w4") == ["w4"] and tm.parse_kinds("w4, w2,mix25") == ["w4", "w2", "mix25"]
    with pytest.raises(ValueError, match="w5"):
        tm.parse_kinds("w4,w5")


def test_main_passes_kinds_default_w4(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tm, "tune_shape", lambda model, tokens, quick, kinds=("w4",): seen.append((model, tokens,
                                                                                                  quick, kinds)))
    assert tm.main(["--models", "tiny", "--tokens", "1,4", "--quick", "--no-cost"]) == 0
    assert tm.main(["--models", "tiny", "--tokens", "16", "--kinds", "w4,w2,mix25", "--no-cost"]) == 0
    assert seen == [("tiny", [1, 4], True, ["w4"]), ("tiny", [16], False, ["w4", "w2", "mix25"])]
    with pytest.raises(SystemExit):
        tm.main(["--kinds", "w4,bogus"])


def test_decode_candidates_hold_swap_asm_and_valid_keys():
    cands = list(tm.candidates(8 / 128, quick=True))
    assert any(c.get("SWAP") for c in cands) and any(c.get("ASM") and not c.get("SWAP") for c in cands)
    assert any(not c.get("ASM") and not c.get("SWAP") for c in cands)  # the generic loop stays a candidate
    for c in cands:
        assert all(isinstance(c[key], int) for key in configs.CFG_KEYS)


def test_tune_writes_by_bits_and_moe_config_reads_it(tiny, monkeypatch):
    from mxserve_kernels.bench.bench_moe import OURS, build_ours
    cands = list(tm.candidates(1 * 2 / 4, quick=True))
    swap = next(c for c in cands if c.get("SWAP"))
    plain_a = next(c for c in cands if not c.get("SWAP") and not c.get("ASM"))
    plain_b = next(c for c in cands if not c.get("SWAP") and not c.get("ASM") and c != plain_a)
    # w4 likes SWAP; w2 alone likes plain_a, mix25 likes plain_b; jointly plain_b wins (w2 12 + mix 10 < 10 + 30)
    fast = [("w4", swap, 10.0), ("w2", plain_a, 10.0), ("w2", plain_b, 12.0), ("mix25", plain_b, 10.0)]
    calls = []
    monkeypatch.setattr(tm, "_measure", _stub_measure(fast, calls))
    path = tiny / configs.config_filename(KEY, configs.device_name())
    kept = {"w13": dict(swap, BLOCK_M=64), "w2": dict(swap, BLOCK_M=64)}
    path.write_text(json.dumps({"1024": kept, "1": {"w13": plain_a, "w2": plain_a,
                                                    "by_bits": {"8": {"w13": plain_a, "w2": plain_a}}}}))
    table = tm.tune_shape("tiny", [1], True, ["w4", "w2", "mix25"], device="cpu")
    assert sorted(calls) == ["mix25", "w2", "w4"]
    on_disk = json.loads(path.read_text())
    assert on_disk == table and on_disk["1024"] == kept  # other token counts kept
    assert on_disk["1"]["w13"] == swap and on_disk["1"]["w2"] == swap
    assert on_disk["1"]["by_bits"]["2"] == {"w13": plain_b, "w2": plain_b}
    assert on_disk["1"]["by_bits"]["8"] == {"w13": plain_a, "w2": plain_a}  # widths not re-tuned kept
    for method, want in (("ours_w4", swap), ("ours_w2", plain_b), ("ours_mix2.5", plain_b)):
        w = build_ours(OURS[method], 4, 128, 128, device="cpu")
        assert moe_config(w, 1, 2) == {"w13": want, "w2": want}, method


def test_tune_w4_only_keeps_plain_format(tiny, monkeypatch):
    cands = list(tm.candidates(1 * 2 / 4, quick=True))
    monkeypatch.setattr(tm, "_measure", _stub_measure([("w4", cands[3], 5.0)], []))
    table = tm.tune_shape("tiny", [1, 4], True, device="cpu")
    assert table == {"1": {"w13": cands[3], "w2": cands[3]}, "4": {"w13": cands[3], "w2": cands[3]}}
