"""Contract: after loading, the mxmoe methods publish this worker's weight bytes by precision and the quant-config
info through the metrics side channel, and the API-server collector turns them into ``mxserve:`` series. Expected
bytes are recomputed from the checkpoint tensors the test loads (canonical storage, scales included)."""
from __future__ import annotations

import itertools

import pytest
import torch

from mxserve_kernels.formats import WeightScheme
from tests.contract.rtn import quantize_rtn
from tests.contract import test_vllm_moe as moe_tests
from tests.contract.test_vllm_moe import DOWN, GATE_UP, H, I, _build, _checkpoint


@pytest.fixture
def metrics_dir(tmp_path, monkeypatch):
    from mxserve.metrics import sidechannel
    from mxserve.vllm_plugin import weight_stats
    monkeypatch.setenv("MXSERVE_METRICS_DIR", str(tmp_path))
    sidechannel._reset_for_tests()
    weight_stats._reset_for_tests()
    sidechannel.configure(model_name="tiny", engine=0)
    yield str(tmp_path)
    sidechannel._reset_for_tests()
    weight_stats._reset_for_tests()


def _label(s: WeightScheme, dense_dtype: str) -> str:
    return dense_dtype if s.bits == 16 else f"int{s.bits}" + ("_nested" if s.nested else "")


def test_moe_and_linears_publish_weight_bytes(vllm_cpu, metrics_dir, monkeypatch):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import ReplicatedLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from mxserve.metrics import sidechannel
    from mxserve.metrics.collector import SideChannelCollector

    # layer indices of their own: pytest may import test_vllm_moe twice (two counters, duplicate layer names)
    monkeypatch.setattr(moe_tests, "_layer_ids", itertools.count(1000))
    moe, _ = _build(vllm_cpu)  # fp32 params: bf16-passthrough experts are stored as fp32 on this layer
    weights, _ = _checkpoint()
    list(moe.load_weights(iter(weights)))
    re_ = moe.routed_experts
    cfg = re_.quant_method.plan_cfg
    expected: dict[str, int] = {}
    for name, t in weights:
        e = int(name.split(".")[0])
        s = WeightScheme.parse((DOWN if ".down_proj." in name else GATE_UP)[e])
        nbytes = t.numel() * (4 if s.bits == 16 else t.element_size())
        expected[_label(s, "fp32")] = expected.get(_label(s, "fp32"), 0) + nbytes
    re_.quant_method.process_weights_after_loading(re_)

    # a bf16 router and an embedding of the same plan (vLLM's unquantized methods, counted too)
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    qc = MxMoEQuantConfig(cfg)
    with set_current_vllm_config(vllm_cpu):
        gate = ReplicatedLinear(H, 8, bias=False, quant_config=qc, prefix="model.layers.0.mlp.gate",
                                params_dtype=torch.bfloat16)
        emb = VocabParallelEmbedding(64, H, quant_config=qc, prefix="model.embed_tokens", params_dtype=torch.bfloat16)
    for layer in (gate, emb):
        layer.quant_method.process_weights_after_loading(layer)
    expected["bf16"] = expected.get("bf16", 0) + (8 * H + emb.weight.numel()) * 2

    snaps = sidechannel.read_snapshots(metrics_dir)
    assert len(snaps) == 1
    quant = snaps[0]["sections"]["quant"]
    assert quant["weight_bytes"] == {k: float(v) for k, v in expected.items()}
    info = quant["quant_config"]
    assert info["scheme"] == "nested" and info["offload"] == "off" and info["kv_bits"] == "auto"
    mix = {int(b): float(f) for b, f in (x.split(":") for x in info["weight_bits_mix"].split(","))}
    elems: dict[int, int] = {}
    for g, d in zip(GATE_UP, DOWN):
        for name, n in ((g, 2 * I * H), (d, H * I)):
            s = WeightScheme.parse(name)
            bits = 32 if s.bits == 16 else s.bits
            elems[bits] = elems.get(bits, 0) + n
    elems[16] = elems.get(16, 0) + 8 * H + emb.weight.numel()
    total = sum(elems.values())
    assert set(mix) == set(elems) and all(abs(mix[b] - elems[b] / total) <= 0.006 for b in elems)

    fams = {f.name: f for f in SideChannelCollector(metrics_dir).collect()}
    samples = {s.labels["precision"]: s.value for s in fams["mxserve:worker_weight_bytes"].samples}
    assert samples == {k: float(v) for k, v in expected.items()}
    assert all(s.labels["model_name"] == "tiny" for s in fams["mxserve:worker_weight_bytes"].samples)
    assert "mxserve:quant_config_info" in fams


def test_linear_publishes_canonical_bytes(vllm_cpu, metrics_dir):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear

    from mxserve.config import MxMoEConfig
    from mxserve.metrics import sidechannel
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    name = "int3_g32_asym"
    pfx = "model.layers.0.self_attn.o_proj"
    qc = MxMoEQuantConfig(MxMoEConfig.from_dict({"quant_method": "mxmoe", "version": 1, "modules": {pfx: name}}))
    with set_current_vllm_config(vllm_cpu):
        layer = RowParallelLinear(H, 64, bias=False, quant_config=qc, prefix=pfx)
    t = quantize_rtn(torch.randn(64, H), WeightScheme.parse(name))
    for suf, v in t.items():
        getattr(layer, suf).weight_loader(getattr(layer, suf), v)
    layer.quant_method.process_weights_after_loading(layer)
    quant = sidechannel.read_snapshots(metrics_dir)[0]["sections"]["quant"]
    assert quant["weight_bytes"] == {"int3": float(sum(v.numel() * v.element_size() for v in t.values()))}
    assert quant["quant_config"]["scheme"] == "uniform" and quant["quant_config"]["weight_bits_mix"] == "3:1.00"
