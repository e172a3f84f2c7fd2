"""demo-model: a few seeded steps write a complete, loadable checkpoint; training is deterministic."""
import dataclasses
import json

import pytest

from mxserve.cli.main import main
from mxserve.models import demo


@pytest.fixture
def small_cpu_preset(monkeypatch):
    """The cpu preset on a smaller corpus slice and eval, so the test runs in seconds (same code path)."""
    monkeypatch.setitem(demo.PRESETS, "cpu", dataclasses.replace(demo.PRESETS["cpu"], corpus_bytes=256 << 10))
    monkeypatch.setattr(demo, "FINAL_EVAL_TOKENS", 2048)


@pytest.mark.slow
def test_demo_model_short_run(tmp_path, small_cpu_preset):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "demo"
    assert main(["demo-model", "--out", str(out), "--device", "cpu", "--steps", "3"]) == 0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "eval.txt", "calib.txt", "train_log.json",
              "loss_curve.png"):
        assert (out / f).exists(), f
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_run"] == 3 and 0 < log["heldout_loss"] < 2 * log["unigram_heldout_loss"]
    AutoModelForCausalLM.from_pretrained(out)
    out2 = tmp_path / "demo2"
    assert main(["demo-model", "--out", str(out2), "--device", "cpu", "--steps", "3"]) == 0
    log2 = json.loads((out2 / "train_log.json").read_text())
    assert log2["train_curve"] == log["train_curve"]  # seeded data order and init
    assert main(["demo-model", "--out", str(out2), "--device", "cpu", "--steps", "3"]) == 2  # exists, no --force
