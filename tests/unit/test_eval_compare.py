"""Eval harness: our loader reproduces transformers' own; a model compared to itself has zero divergence."""
from __future__ import annotations

import pytest
import torch

from mxserve.eval import compare, load_dequantized_model
from tests.tolerances import GEMM


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mxserve.models.tiny import make_tiny
    d = tmp_path_factory.mktemp("tiny_eval")
    src = make_tiny("mixtral", d / "src", layers=1, experts=4, top_k=2, hidden=64, inter=64)
    (d / "eval.txt").write_text("def f(x):\n    return x + 1\n" * 40)
    return src


def test_loader_matches_transformers(tiny):
    from transformers import AutoModelForCausalLM
    ours = load_dequantized_model(tiny)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, **GEMM[torch.float32])


def test_self_comparison_is_exact(tiny):
    r = compare(tiny, tiny, tiny.parent / "eval.txt", device="cpu", seq_len=64)
    assert r["kld"] == pytest.approx(0.0, abs=1e-9) and r["top1"] == 1.0 and r["ppl"] == r["ppl_ref"]
