"""Atomic checkpoint writer and lazy reader."""
from __future__ import annotations

import json

import pytest
import torch

from mxserve.checkpoint.writer import AtomicCheckpointWriter
from tests.tolerances import BIT_EXACT

CFG = {"model_type": "qwen3_moe", "num_hidden_layers": 1, "num_experts": 1, "num_experts_per_tok": 1,
       "hidden_size": 8, "moe_intermediate_size": 8}


def test_commit_writes_main_shards_before_plane_shards(tmp_path):
    w = AtomicCheckpointWriter(tmp_path / "out", shard_bytes=64)
    w.add("a.qweight", torch.zeros(8, 8, dtype=torch.uint8))
    w.add("a.plane3_weight", torch.ones(8, 1, dtype=torch.uint8), stream="plane3")
    w.add("a.plane4_weight", torch.ones(8, 1, dtype=torch.uint8), stream="plane4")
    w.add("b.weight", torch.ones(4, 4, dtype=torch.bfloat16))
    out = w.commit(CFG)
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert idx["a.qweight"] < idx["a.plane3_weight"] < idx["a.plane4_weight"]
    assert idx["b.weight"] < idx["a.plane3_weight"]
    from mxserve.checkpoint.reader import HFCheckpoint
    ck = HFCheckpoint(out)
    torch.testing.assert_close(ck.tensor("b.weight"), torch.ones(4, 4, dtype=torch.bfloat16), **BIT_EXACT)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_error_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicCheckpointWriter(tmp_path / "out") as w:
            w.add("x", torch.zeros(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--force"):
        AtomicCheckpointWriter(tmp_path / "out")
    w = AtomicCheckpointWriter(tmp_path / "out", force=True)
    w.add("x", torch.zeros(2))
    assert (w.commit(CFG) / "model.safetensors").is_file()


def test_duplicate_tensor_rejected(tmp_path):
    w = AtomicCheckpointWriter(tmp_path / "out")
    w.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="'x' written twice"):
        w.add("x", torch.zeros(2))
    w.abort()


def test_reader_errors_name_the_file(tmp_path):
    from mxserve.checkpoint.reader import HFCheckpoint
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFCheckpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported architecture model_type='llama'"):
        HFCheckpoint(tmp_path)
