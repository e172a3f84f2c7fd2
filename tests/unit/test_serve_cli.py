"""``mxserve serve`` decision logic: vLLM exec on CUDA (``--quantization mxmoe`` only for mxmoe checkpoints, extra
args passed through), embedded engine otherwise or when forced, argument errors."""
from __future__ import annotations

import json

import pytest

from mxserve.cli import serve as cli
from mxserve.cli.main import main


@pytest.fixture
def ckpt(tmp_path):
    def make(quant: bool):
        d = tmp_path / ("q" if quant else "bf16")
        d.mkdir()
        cfg = {"model_type": "qwen3_moe"}
        if quant:
            cfg["quantization_config"] = {"quant_method": "mxmoe", "version": 1}
        (d / "config.json").write_text(json.dumps(cfg))
        return d
    return make


def test_vllm_command_adds_quantization_only_for_mxmoe(ckpt):
    d = ckpt(True)
    q = cli.vllm_command(str(d), "0.0.0.0", 9000, "m", ["--tensor-parallel-size", "2"])
    assert q[q.index("serve") + 1] == str(d)
    assert q[q.index("serve") + 2:] == \
        ["--host", "0.0.0.0", "--port", "9000", "--quantization", "mxmoe", "--served-model-name", "m",
         "--tensor-parallel-size", "2"]
    b = cli.vllm_command(str(ckpt(False)), "h", 1, None, [])
    assert "--quantization" not in b


def test_force_embedded_wins(monkeypatch):
    monkeypatch.setenv("MXSERVE_FORCE_EMBEDDED", "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert cli.vllm_usable() == (False, "MXSERVE_FORCE_EMBEDDED is set")
    monkeypatch.delenv("MXSERVE_FORCE_EMBEDDED")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli.vllm_usable() == (False, "no CUDA device")


def test_dry_run_paths(ckpt, monkeypatch, capsys):
    d = ckpt(True)
    monkeypatch.setattr(cli, "vllm_usable", lambda: (True, ""))
    assert main(["serve", str(d), "--port", "9001", "--dry-run", "--", "--enforce-eager"]) == 0
    out = capsys.readouterr().out
    assert "serve " + str(d) in out and "--quantization mxmoe" in out and out.rstrip().endswith("--enforce-eager")
    monkeypatch.setattr(cli, "vllm_usable", lambda: (False, "no CUDA device"))
    assert main(["serve", str(d), "--dry-run"]) == 0
    assert "embedded CPU engine (no CUDA device)" in capsys.readouterr().out
    assert main(["serve", str(d), "--engine", "vllm", "--dry-run"]) == 2      # asked for vLLM, not usable
    assert main(["serve", "--dry-run"]) == 2                                    # neither MODEL nor --demo
    assert main(["serve", str(d.parent / "missing"), "--dry-run"]) == 2
