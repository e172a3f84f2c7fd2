"""`mxserve quantize / inspect / eval` end to end on a tiny random checkpoint (RTN: fast on CPU)."""
from __future__ import annotations

import json
import shutil

import pytest

from mxserve.cli.main import main
from mxserve.config.quant_config import MxMoEConfig
from tests.tolerances import KLD_W8_MAX

pytestmark = pytest.mark.slow  # builds a tiny checkpoint and runs quantize/eval end to end (~1 min idle CPU)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mxserve.models.corpus import read_corpus
    from mxserve.models.tiny import make_tiny
    d = tmp_path_factory.mktemp("tiny")
    src = make_tiny("qwen3_moe", d / "src", layers=2, experts=8, top_k=2, hidden=128, inter=128)
    train, held = read_corpus(max_bytes=1 << 20)
    (d / "calib.txt").write_text(train[:60_000])
    (d / "eval.txt").write_text(held[:20_000])
    return d


def _q(tiny, name, *extra):
    out = tiny / name
    rc = main(["quantize", str(tiny / "src"), "--out", str(out), "--calib", str(tiny / "calib.txt"),
               "--method", "rtn", "--samples", "8", "--seq-len", "64", "--json", *extra])
    return rc, out


def test_quantize_inspect_eval_mixed(tiny, capsys):
    rc, out = _q(tiny, "mixed", "--bits", "3.0", "--attn-bits", "8")
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    qc = MxMoEConfig.from_dict(cfg["quantization_config"])
    assert qc.meta["avg_bits"] <= 3.0 + 1e-9 and qc.meta["calibration"]["tokens"] > 0
    assert len(qc.experts) == 2 and all(p.num_experts == 8 for p in qc.experts.values())
    assert any(k.endswith("self_attn.q_proj") for k in qc.modules)
    assert (out / "tokenizer.json").is_file()
    capsys.readouterr()
    png = tiny / "heat.png"
    assert main(["inspect", str(out), "--json", "--png", str(png)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["avg_bits"] == pytest.approx(qc.meta["avg_bits"])
    assert s["stored_bits"] == pytest.approx(s["avg_bits"], rel=1e-6)  # non-nested: stored == planned
    assert png.stat().st_size > 0
    assert main(["eval", str(out), "--ref", str(tiny / "src"), "--text", str(tiny / "eval.txt"), "--json",
                 "--device", "cpu", "--max-tokens", "2048", "--seq-len", "128"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kld"] > 0 and 0 <= r["top1"] <= 1


def test_uniform_int8_matches_reference(tiny, capsys):
    rc, out = _q(tiny, "w8", "--bits", "8.25", "--uniform")
    assert rc == 0
    capsys.readouterr()
    main(["eval", str(out), "--ref", str(tiny / "src"), "--text", str(tiny / "eval.txt"), "--json",
          "--device", "cpu", "--max-tokens", "2048", "--seq-len", "128"])
    r = json.loads(capsys.readouterr().out)
    assert r["kld"] < KLD_W8_MAX


def test_nested_writes_planes_in_their_own_shards(tiny, capsys):
    rc, out = _q(tiny, "nested", "--bits", "3.5", "--nested")
    assert rc == 0
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base = {f for n, f in idx.items() if not n.split(".")[-1].startswith("plane")}
    planes = {f for n, f in idx.items() if n.split(".")[-1].startswith("plane")}
    assert base.isdisjoint(planes) and max(base) < min(planes)


@pytest.mark.parametrize("args,msg", [
    (["--bits", "1.0"], "below the cheapest scheme int1_g128_asym"),  # int1 asym g128 = 1.25 bits
    (["--bits", "3", "--group-size", "128", "--candidates", "int4_g128_asym,int2_g256_asym"], "group_size must be one of"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tiny, capsys, args, msg):
    rc, out = _q(tiny, "bad", *args)
    assert rc == 2 and msg in capsys.readouterr().err
    assert not out.exists() and not [p for p in tiny.iterdir() if p.name.startswith(".bad")]


def test_missing_expert_tensor_names_it(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(tiny / "src", broken)
    t = load_file(str(broken / "model.safetensors"))
    del t["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(t, str(broken / "model.safetensors"))
    rc = main(["quantize", str(broken), "--out", str(tmp_path / "q"), "--bits", "3", "--method", "rtn"])
    assert rc == 2 and "model.layers.0.mlp.experts.3.up_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
