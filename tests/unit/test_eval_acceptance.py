"""Acceptance script end to end on a tiny random checkpoint: baseline is the issue's uniform scheme at the same
true bits, every mixed variant stays within the budget, ratios are computed from the measured KLDs."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # 3 quantize + eval runs of a tiny model (~1 min idle CPU)


def test_measure_reports_baseline_and_every_variant(tmp_path):
    from mxserve.eval.acceptance import measure
    from mxserve.models.corpus import read_corpus
    from mxserve.models.tiny import make_tiny
    d = make_tiny("qwen3_moe", tmp_path / "demo", layers=2, experts=8, top_k=2, hidden=128, inter=128)
    train, held = read_corpus(max_bytes=1 << 20)
    (d / "calib.txt").write_text(train[:20_000])
    (d / "eval.txt").write_text(held[:4_000])
    res = measure(str(d), [3.25], "cpu", method="rtn", samples=4, seq_len=64, variants=("layer", "none", "perlayer", "insample"))
    row = res["budgets"]["3.25"]
    assert row["uniform"]["histogram"] == {"int3_g128_asym": 2 * 8 * 2} and row["uniform"]["avg_bits"] == 3.25
    for key in ("mixed", "mixed_none", "mixed_perlayer", "mixed_insample"):
        assert row[key]["avg_bits"] <= 3.25 + 1e-9
        assert row[f"kld_ratio_{key}_over_uniform"] == pytest.approx(row[key]["kld"] / row["uniform"]["kld"])
    assert res["variants"] == ["layer", "none", "perlayer", "insample"] and res["seconds"] > 0
