"""Per-precision launch configs: ``configs.dominant_bits`` (the one definition of a projection's width),
``configs.lookup`` with ``by_bits`` entries (fallbacks, old files, bad files) and what ``fused_moe`` launches."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from mxserve_kernels._common import configs
from mxserve_kernels._common.layout import (F_BITS, F_KIND, KIND_BF16, KIND_INT, KIND_INT3, KIND_NESTED, KIND_NONE,
                                            PackedWeights)
from mxserve_kernels.bench.bench_moe import OURS, build_ours
from mxserve_kernels.moe import MoEWeights

E, H, I = 4, 128, 128
KEY = {"E": E, "H": H, "I": I}
fm = importlib.import_module("mxserve_kernels.moe.fused_moe")


def _cfg(bm, bn=32, bk=16, **kw):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": 3, **kw}


def _write(tmp_path, monkeypatch, table, key=KEY):
    monkeypatch.setattr(configs, "CONFIG_DIR", str(tmp_path))
    configs._load.cache_clear()
    (tmp_path / configs.config_filename(key, configs.device_name())).write_text(json.dumps(table))


@pytest.fixture(autouse=True)
def _fresh_cache():
    configs._load.cache_clear()
    yield
    configs._load.cache_clear()


def _rows(*kinds):
    """(kind, bits) rows from (kind, bits, count) triples."""
    return [(k, b) for k, b, n in kinds for _ in range(n)]


@pytest.mark.parametrize("rows,what", [
    (_rows((KIND_INT, 4, 8)), "uniform W4"),
    (_rows((KIND_INT, 2, 96), (KIND_INT, 4, 32)), "mix2.5: 192 int2 bits vs 128 int4 bits"),
    (_rows((KIND_INT, 2, 3), (KIND_INT3, 3, 1)), "75 % int2 / 25 % int3"),
    (_rows((KIND_INT, 2, 1), (KIND_INT, 4, 1)), "one each: the wider carries more bits"),
    (_rows((KIND_INT, 2, 2), (KIND_INT, 4, 1)), "tie 4 vs 4 bits"),
    (_rows((KIND_BF16, 16, 1), (KIND_INT, 4, 3)), "bf16 16 bits vs 12"),
    (_rows((KIND_NESTED, 3, 3), (KIND_INT, 4, 2)), "nested prefix 3 counts 3"),
    (_rows((KIND_NONE, 0, 10), (KIND_INT, 8, 1)), "experts without weights ignored"),
    ([], "no experts"),
])
def test_dominant_bits_is_bits_weighted_majority(rows, what):
    totals: dict[int, int] = {}  # the definition spelled out independently: width -> summed bits, ties to the wider
    for kind, bits in rows:
        if kind != KIND_NONE:
            b = 16 if kind == KIND_BF16 else bits
            totals[b] = totals.get(b, 0) + b
    want = max(sorted(totals), key=lambda b: totals[b] * 100 + b) if totals else configs.REFERENCE_BITS
    assert configs.dominant_bits(rows) == want, what


def test_dominant_bits_known_layers():
    assert configs.dominant_bits(_rows((KIND_INT, 2, 96), (KIND_INT, 4, 32))) == 2
    assert configs.dominant_bits(_rows((KIND_INT, 2, 2), (KIND_INT, 4, 1))) == 4  # tie -> wider
    assert configs.dominant_bits([]) == 4


@pytest.mark.parametrize("method", ["ours_w4", "ours_w2", "ours_w3", "ours_w8", "ours_mix2.5", "ours_bf16"])
def test_projection_bits_of_bench_layers_read_once(method, monkeypatch):
    w = build_ours(OURS[method], E, H, I, device="cpu")
    want = configs.dominant_bits((r[F_KIND], r[F_BITS]) for r in w.w13.einfo.tolist())
    assert configs.projection_bits(w.w13) == configs.projection_bits(w.w2) == want
    assert w.w13._dominant_bits == want  # stored on the PackedWeights
    monkeypatch.setattr(configs, "dominant_bits", lambda rows: pytest.fail("einfo read twice"))
    assert configs.projection_bits(w.w13) == want


def test_projection_bits_never_reads_weights_built_in_forwards():
    w = build_ours(OURS["ours_w2"], E, H, I, device="cpu").w13
    view = PackedWeights(w.qw, w.pw, w.meta, w.wbf, w.einfo, w.n, w.k, kinds=w.kinds_mask)  # slot-pool style
    assert configs.projection_bits(view) == configs.REFERENCE_BITS
    view._dominant_bits = 2  # a builder that knows the width may store it
    assert configs.projection_bits(view) == 2
    fake = PackedWeights(w.qw, w.pw, w.meta, w.wbf, w.einfo.to("meta"), w.n, w.k)
    assert configs.projection_bits(fake) == configs.REFERENCE_BITS


def test_lookup_old_file_and_fallbacks(tmp_path, monkeypatch):
    assert configs.lookup(KEY, 4, bits=2) is None  # no file at all (CONFIG_DIR of the repo has no such shape)
    old = {"1": {"w13": _cfg(16), "w2": _cfg(16)}, "64": {"w13": _cfg(32), "w2": _cfg(32)}}
    _write(tmp_path, monkeypatch, old)
    for bits in (2, 3, 4, 16):
        assert configs.lookup(KEY, 2, bits=bits) == old["1"]  # old files: every width gets today's entry
    assert configs.lookup(KEY, 40) == old["64"]


def test_lookup_by_bits_entries(tmp_path, monkeypatch):
    w2pair = {"w13": _cfg(16, 64), "w2": _cfg(16, 128)}
    table = {"1": {"w13": _cfg(16), "w2": _cfg(16), "by_bits": {"2": w2pair}},
             "1024": {"w13": _cfg(64, 128), "w2": _cfg(64, 128)},
             "4096": {"by_bits": {"2": w2pair}}}
    _write(tmp_path, monkeypatch, table)
    assert configs.lookup(KEY, 3, bits=2) == w2pair
    plain = {"w13": _cfg(16), "w2": _cfg(16)}
    assert configs.lookup(KEY, 3) == plain and configs.lookup(KEY, 3, bits=3) == plain  # width without entry
    assert configs.lookup(KEY, 1000, bits=2) == table["1024"]  # nearest T has no by_bits: its plain entry
    assert configs.lookup(KEY, 4096, bits=2) == w2pair
    assert configs.lookup(KEY, 4096, bits=4) is None  # per-width-only entry: caller uses the default


@pytest.mark.parametrize("table,needle", [
    ({"x": {"w13": _cfg(16), "w2": _cfg(16)}}, "'x'"),
    ({"1": {"w13": {"BLOCK_M": 16}, "w2": _cfg(16)}}, "[1].w13"),
    ({"1": {"w13": _cfg(16), "w2": _cfg(16), "by_bits": {"two": {}}}}, "[1].by_bits"),
    ({"1": {"w13": _cfg(16), "w2": _cfg(16), "by_bits": {"2": {"w13": _cfg(16), "w9": _cfg(16)}}}}, "by_bits[2]"),
])
def test_bad_file_names_file_and_field(tmp_path, monkeypatch, table, needle):
    _write(tmp_path, monkeypatch, table)
    with pytest.raises(ValueError) as exc:
        configs.lookup(KEY, 1, bits=2)
    assert needle in str(exc.value) and "device_name=" in str(exc.value)


def test_merge_tables_keeps_untouched_entries():
    old = {"1": {"w13": _cfg(16), "w2": _cfg(16), "by_bits": {"3": {"w13": _cfg(32), "w2": _cfg(32)}}},
           "1024": {"w13": _cfg(64), "w2": _cfg(64)}}
    new = {"1": {"by_bits": {"2": {"w13": _cfg(16, 64), "w2": _cfg(16, 64)}}}, "4": {"w13": _cfg(16), "w2": _cfg(16)}}
    out = configs.merge_tables(old, new)
    assert list(out) == ["1", "4", "1024"]
    assert out["1"]["w13"] == old["1"]["w13"] and set(out["1"]["by_bits"]) == {"2", "3"}
    assert out["4"] == new["4"] and "by_bits" not in out["1024"]


def _launched(monkeypatch, w, t=2, k=2):
    """Configs ``fused_moe`` hands to the two grouped-GEMM launches (launcher and routing stubbed)."""
    seen = []

    class _Route:
        def __init__(self, bm):
            self.block_m = bm

    def gemm(x, pw, cfg, *, mode, route, **kw):
        assert route.block_m == cfg["BLOCK_M"]
        seen.append(cfg)
        return torch.zeros(t * k, pw.n // 2 if mode == fm.MODE_GATE_UP else pw.n, dtype=x.dtype)

    monkeypatch.setattr(fm, "triton_usable", lambda x: True)
    monkeypatch.setattr(fm, "moe_align", lambda ids, e, bm, emap=None: _Route(bm))
    monkeypatch.setattr(fm, "grouped_gemm", gemm)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(t)])
    fm.fused_moe(torch.randn(t, H, dtype=torch.bfloat16), w, torch.full((t, k), 0.5), ids)
    return seen


def test_fused_moe_launches_the_tuned_width(tmp_path, monkeypatch):
    pair2 = {"w13": _cfg(16, 64, SWAP=0), "w2": _cfg(16, 128)}
    pair3 = {"w13": _cfg(32, 64), "w2": _cfg(32, 32)}
    plain = {"w13": _cfg(16, 32, ASM=1, SWAP=1), "w2": _cfg(16, 64, ASM=1, SWAP=1)}
    _write(tmp_path, monkeypatch, {"1": {**plain, "by_bits": {"2": pair2, "3": pair3}}})
    w4, w2, mix = (build_ours(OURS[m], E, H, I, device="cpu") for m in ("ours_w4", "ours_w2", "ours_mix2.5"))
    assert _launched(monkeypatch, w4) == [plain["w13"], plain["w2"]]
    assert _launched(monkeypatch, w2) == [pair2["w13"], pair2["w2"]]
    assert _launched(monkeypatch, mix) == [pair2["w13"], pair2["w2"]]  # dominant width 2
    # projections of different widths: each its own entry when BLOCK_M agrees, else gate_up's entry for both
    assert _launched(monkeypatch, MoEWeights(w2.w13, w4.w2, H, I)) == [pair2["w13"], plain["w2"]]
    w3 = build_ours(OURS["ours_w3"], E, H, I, device="cpu")
    assert _launched(monkeypatch, MoEWeights(w2.w13, w3.w2, H, I)) == [pair2["w13"], pair2["w2"]]
    assert _launched(monkeypatch, MoEWeights(w3.w13, w2.w2, H, I)) == [pair3["w13"], pair3["w2"]]


def test_fused_moe_default_without_file(monkeypatch, tmp_path):
    monkeypatch.setattr(configs, "CONFIG_DIR", str(tmp_path))
    w2 = build_ours(OURS["ours_w2"], E, H, I, device="cpu")
    d = configs.default_config(2 * 2 / E)
    assert _launched(monkeypatch, w2) == [d, d]
