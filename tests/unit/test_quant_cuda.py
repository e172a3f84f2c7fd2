"""CUDA path of the quantizer (skipped without a GPU): GPTQ on the device agrees with CPU; quantize end to end."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.formats import WeightScheme
from mxserve.quant.gptq.solver import quantize_weight
from tests.tolerances import GPTQ_GAIN_DB_3BIT, sqnr_db

pytestmark = pytest.mark.gpu


def test_gptq_cuda_matches_cpu_quality():
    k = 256
    x = torch.randn(2048, k) @ (torch.eye(k) + torch.randn(k, k) / k ** 0.5 * 2)
    h = 2.0 / x.shape[0] * x.t() @ x
    w = torch.randn(4, 128, k) * 0.05
    s = WeightScheme(3, 128)
    _, _, dq_cpu = quantize_weight(w, h.expand(4, k, k), s)
    _, _, dq_gpu = quantize_weight(w.cuda(), h.expand(4, k, k).cuda(), s)
    a = sqnr_db(x @ w[0].t(), x @ dq_cpu[0].t())
    b = sqnr_db(x @ w[0].t(), x @ dq_gpu[0].cpu().t())
    assert abs(a - b) < GPTQ_GAIN_DB_3BIT / 4


def test_quantize_checkpoint_on_cuda(tmp_path):
    from mxserve.eval.compare import compare
    from mxserve.models.corpus import read_corpus
    from mxserve.models.tiny import make_tiny
    from mxserve.quant.api import quantize_checkpoint
    src = make_tiny("qwen3_moe", tmp_path / "src", hidden=128, inter=128)
    train, held = read_corpus(max_bytes=1 << 20)
    (tmp_path / "c.txt").write_text(train[:50_000])
    (tmp_path / "e.txt").write_text(held[:20_000])
    s = quantize_checkpoint(src, tmp_path / "q", bits=3.25, calib=str(tmp_path / "c.txt"), device="cuda",
                            progress=False, attn_bits=8)
    assert s["avg_bits"] <= 3.25 + 1e-9
    r = compare(src, tmp_path / "q", tmp_path / "e.txt", device="cuda")
    assert 0 < r["kld"] < 1 and r["top1"] > 0.5
