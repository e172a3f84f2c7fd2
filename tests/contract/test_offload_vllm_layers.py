"""Contract: expert offloading wired into vLLM's real ``FusedMoE`` (CPU platform). Two MoE layers of one model with an
``offload`` section get ``OffloadMoEMethod`` sharing one ``ExpertCache``; create_weights -> load -> process (arena
writes, flat parameters dropped, preload after the last layer) -> apply (``ensure`` + the grouped GEMM over the slot
pool) must equal the non-offloaded ``MxMoEMethod`` on the same checkpoint (the reference path). Also the
compilation hook (MoE ops become splitting ops, PIECEWISE graphs; logged eager fallback or a clear error)."""
from __future__ import annotations

import itertools
import logging
from types import SimpleNamespace

import pytest
import torch

from mxserve.config import MxMoEConfig
from mxserve_kernels.formats import WeightScheme
from tests.contract.rtn import quantize_rtn
from tests.tolerances import BIT_EXACT

E, TOPK, H, I, T = 8, 2, 128, 64, 7
# per expert runtime prefix (the plan's bits): 2 = int2 base only, 3 = base + plane 3, 4 = all planes
SCHEMES = ["int2_g32_asym_nested4", "int2_g32_asym_nested3", "int2_g32_asym_nested2", "int2_g32_asym_nested4",
           "int2_g32_asym_nested4", "int2_g32_asym_nested3", "int2_g32_asym_nested4", "int2_g32_asym_nested2"]
_ids = itertools.count(500)     # layer numbers unused by the other contract tests


DOWN = SCHEMES[3:] + SCHEMES[:3]     # an expert's down may run at another prefix than its gate_up


def _model(vllm_cpu, offload: dict | None, n_layers: int = 2, schemes=SCHEMES, down=DOWN):
    """n_layers FusedMoE layers of one model (one quant config); layer i+1 holds a router gate for look-ahead."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.fused_moe import FusedMoE

    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    base = next(_ids)
    pfx = [f"model.layers.{base * 10 + i}.mlp.experts" for i in range(n_layers)]
    d = {"quant_method": "mxmoe", "version": 1, "experts": {p: {"gate_up": schemes, "down": down} for p in pfx}}
    if offload is not None:
        d["offload"] = offload
    qc = MxMoEQuantConfig(MxMoEConfig.from_dict(d))
    layers = []
    g = torch.Generator().manual_seed(7)
    with set_current_vllm_config(vllm_cpu):
        for p in pfx:
            gate = torch.nn.Linear(H, E, bias=False)
            gate.weight.data = torch.randn(E, H, generator=g)
            layers.append(FusedMoE(num_experts=E, top_k=TOPK, hidden_size=H, intermediate_size=I,
                                   params_dtype=torch.float32, quant_config=qc, prefix=p, gate=gate))
    return qc, layers


def _checkpoint(seed: int, schemes=SCHEMES, down=DOWN):
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in range(E):
        for proj, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            s = WeightScheme.parse(down[e] if proj == "down_proj" else schemes[e])
            out += [(f"{e}.{proj}.{suf}", v) for suf, v in quantize_rtn(torch.randn(*shape, generator=g) * 0.1,
                                                                         s).items()]
    return out


def _load(layers):
    for i, moe in enumerate(layers):
        list(moe.load_weights(iter(_checkpoint(seed=i))))
    for moe in layers:
        re_ = moe.routed_experts
        re_.quant_method.process_weights_after_loading(re_)


def _routing(step: int, layer: int):
    g = torch.Generator().manual_seed(100 * step + layer)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(T)]).to(torch.int32)
    return torch.randn(T, H, generator=g), torch.rand(T, TOPK, generator=g), ids


@pytest.mark.parametrize("offload", [{"version": 1, "gpu_budget_fraction": 0.5, "on_miss": "wait"},
                                     {"version": 1, "policy": "lru", "gpu_budget_fraction": 0.6, "on_miss": "wait"},
                                     {"version": 1}])
def test_offloaded_layers_equal_reference(vllm_cpu, offload):
    from mxserve.vllm_plugin.moe_method import MxMoEMethod
    from mxserve.vllm_plugin.offload_method import OffloadMoEMethod
    qc, off = _model(vllm_cpu, offload)
    _, ref = _model(vllm_cpu, None)
    assert all(type(m.routed_experts.quant_method) is OffloadMoEMethod for m in off)
    assert all(type(m.routed_experts.quant_method) is MxMoEMethod for m in ref)
    _load(off)
    _load(ref)
    rt = qc.offload_runtime()
    assert off[0].routed_experts.quant_method.runtime is rt is off[1].routed_experts.quant_method.runtime
    for m in off:     # flat loading parameters dropped: the experts live in the arena / slot pool only
        assert not any(n.startswith(("w13_", "w2_")) for n, _ in m.routed_experts.named_parameters())
    cache = rt.cache
    assert cache.L == 2 and cache.E == E
    assert cache.target[0].tolist() == [max(WeightScheme.parse(a).bits, WeightScheme.parse(b).bits)
                                        for a, b in zip(SCHEMES, DOWN)]
    for step in range(4):
        for l in range(2):
            x, w, ids = _routing(step, l)
            a = off[l].routed_experts
            b = ref[l].routed_experts
            got = a.quant_method.apply(a, x, w, ids, None, None)
            want = b.quant_method.apply(b, x, w, ids, None, None)
            torch.testing.assert_close(got, want, **BIT_EXACT)
    snap = cache.snapshot()
    assert snap["expert_cache_hits"] + snap["expert_cache_misses"] > 0
    assert rt.routers[1] is off[1].gate.weight          # look-ahead router of the next layer found
    if offload.get("gpu_budget_fraction", 1.0) < 1.0:
        assert snap["expert_cache_misses"] > 0 and snap["expert_h2d_bytes"] > 0
        assert snap["prefetch_issued"] > 0
    else:
        assert snap["expert_cache_misses"] == 0 and snap["expert_h2d_bytes"] == 0


def test_base_degradation_runs_lower_prefix(vllm_cpu):
    """on_miss=base with a tiny budget: results stay finite and every routed expert ran at >= its int2 base."""
    qc, off = _model(vllm_cpu, {"version": 1, "gpu_budget_fraction": 0.3, "on_miss": "base"})
    _load(off)
    for step in range(3):
        for l in range(2):
            x, w, ids = _routing(step, l)
            a = off[l].routed_experts
            assert torch.isfinite(a.quant_method.apply(a, x, w, ids, None, None)).all()
    mix = qc.offload_runtime().cache.stats()["plane_mix"]
    assert sum(mix.values()) == 3 * 2 * T * TOPK and mix.get(0, 0) == 0


def test_kernel_warmup_runs_once_over_the_slot_pool(vllm_cpu, monkeypatch):
    """The offload path warms its kernels at load like the resident one (it compiled inside serving before): one
    ``warm_kernels`` call after the last layer, over slot-pool weights with the static ``SLOT_KINDS`` mask."""
    from mxserve.vllm_plugin import kernel_adapter
    from mxserve_kernels.moe.slot_weights import SLOT_KINDS
    calls = []
    monkeypatch.setattr(kernel_adapter, "warm_kernels", lambda w, top_k=None, expert_map=None: calls.append(
        (w, top_k, expert_map)) or 0)
    qc, off = _model(vllm_cpu, {"version": 1, "gpu_budget_fraction": 0.5})
    _load(off)
    assert len(calls) == 1, calls
    w, top_k, _ = calls[0]
    pool = qc.offload_runtime().cache.pool.buf
    assert top_k == TOPK and w.num_experts == E
    assert w.w13.kinds_mask == w.w2.kinds_mask == SLOT_KINDS
    assert w.w13.qw.data_ptr() == pool.data_ptr() and w.w2.meta.data_ptr() == pool.data_ptr()


def test_non_nested_expert_is_named(vllm_cpu):
    from mxserve.vllm_plugin.offload_method import OffloadSetupError
    schemes = ["int4_g32_asym"] + SCHEMES[1:]
    _, off = _model(vllm_cpu, {"version": 1}, n_layers=1, schemes=schemes)
    list(off[0].load_weights(iter(_checkpoint(0, schemes))))
    re_ = off[0].routed_experts
    with pytest.raises(OffloadSetupError, match=r"experts\.0 gate_up scheme 'int4_g32_asym' is not nested"):
        re_.quant_method.process_weights_after_loading(re_)


def test_bad_offload_section_is_named():
    from mxserve.scheduler.config import OffloadConfigError
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    with pytest.raises(OffloadConfigError, match="offload: unknown field"):
        MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1, "offload": {"version": 1, "bogus": 1}})


def _vcfg(**cc):
    from vllm.config.compilation import CompilationConfig
    return SimpleNamespace(compilation_config=CompilationConfig(**cc), model_config=SimpleNamespace(enforce_eager=False))


def test_compilation_hook_makes_moe_a_splitting_op(caplog):
    from vllm.config.compilation import (
        CompilationConfig,
        CompilationMode,
        CUDAGraphMode,
    )

    from mxserve.scheduler.config import OffloadConfig
    from mxserve.vllm_plugin.offload_method import (
        MOE_OPS,
        OffloadSetupError,
        apply_compilation_hook,
    )
    v = _vcfg(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    assert apply_compilation_hook(v, OffloadConfig()) == "piecewise"
    cc = v.compilation_config
    assert cc.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert set(CompilationConfig._attention_ops) | set(MOE_OPS) <= set(cc.splitting_ops)
    assert "vllm::unified_kv_cache_update" in cc.splitting_ops
    v = _vcfg(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.PIECEWISE, splitting_ops=["a::b"])
    apply_compilation_hook(v, OffloadConfig())
    assert v.compilation_config.splitting_ops == ["a::b", *MOE_OPS]
    # eager already: untouched
    v = _vcfg(mode=CompilationMode.NONE, cudagraph_mode=CUDAGraphMode.NONE)
    assert apply_compilation_hook(v, OffloadConfig()) == "eager" and v.compilation_config.splitting_ops is None
    # graphs without splitting (e.g. breakable graphs): logged eager fallback, or a clear error
    v = _vcfg(mode=CompilationMode.NONE, cudagraph_mode=CUDAGraphMode.PIECEWISE)
    with pytest.raises(OffloadSetupError, match="allow_eager_fallback"):
        apply_compilation_hook(v, OffloadConfig(allow_eager_fallback=False))
    with caplog.at_level(logging.WARNING, logger="mxserve"):
        assert apply_compilation_hook(v, OffloadConfig()) == "eager"
    assert v.model_config.enforce_eager and v.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert "falling back to eager" in caplog.text
    assert apply_compilation_hook(v, OffloadConfig(enabled=False)) == "disabled"


def test_config_hook_wraps_platform_once(vllm_cpu):
    """An enabled offload section wraps the platform's check_and_update_config (idempotently); the wrapper's
    post-step applies the hook for mxmoe offload models only."""
    import vllm.platforms as P
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    from mxserve.vllm_plugin.offload_method import (
        MOE_OPS,
        install_config_hook,
        offload_config_update,
    )
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    qc = MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1, "offload": {"version": 1}})
    cls = type(P.current_platform)
    assert cls._mxserve_offload_hook
    fn = cls.check_and_update_config.__func__
    install_config_hook()
    assert cls.check_and_update_config.__func__ is fn         # not wrapped twice
    v = _vcfg(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL)
    v.quant_config = qc
    assert offload_config_update(v) == "piecewise" and set(MOE_OPS) <= set(v.compilation_config.splitting_ops)
    v = _vcfg(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL)
    v.quant_config = MxMoEQuantConfig.from_config({"quant_method": "mxmoe", "version": 1})
    assert offload_config_update(v) is None and v.compilation_config.cudagraph_mode == CUDAGraphMode.FULL


def test_graph_batch_output_has_one_static_address(vllm_cpu):
    """Issue 7: vLLM replays piecewise CUDA graphs at the input addresses seen at capture (no copy), and the MoE op
    is a split point, so in a graph batch every layer must return its output at the same address (the runtime's
    static buffer), with the same values as outside graphs; outside graph batches it returns a fresh tensor."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.forward_context import set_forward_context

    from mxserve.vllm_plugin.offload_method import in_graph_batch
    qc, off = _model(vllm_cpu, {"version": 1, "gpu_budget_fraction": 0.5, "on_miss": "wait"})
    _, ref = _model(vllm_cpu, None)
    _load(off)
    _load(ref)
    rt = qc.offload_runtime()
    rt.alloc_out(T + 1, H, torch.float32, "cpu")           # the CPU platform captures no graphs: size it here
    assert not in_graph_batch()
    for step in range(2):
        for l in range(2):
            x, w, ids = _routing(step, l)
            a, b = off[l].routed_experts, ref[l].routed_experts
            want = b.quant_method.apply(b, x, w, ids, None, None)
            eager = a.quant_method.apply(a, x, w, ids, None, None)
            with set_forward_context(None, vllm_cpu, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE):
                assert in_graph_batch()
                got = a.quant_method.apply(a, x, w, ids, None, None)
            assert got.data_ptr() == rt.out.data_ptr() and eager.data_ptr() != rt.out.data_ptr()
            torch.testing.assert_close(got, want, **BIT_EXACT)
            torch.testing.assert_close(eager, want, **BIT_EXACT)
    x, w, ids = _routing(9, 0)
    x, w, ids = torch.cat([x, x]), torch.cat([w, w]), torch.cat([ids, ids])     # 2T rows > the buffer's T + 1
    a = off[0].routed_experts
    with (set_forward_context(None, vllm_cpu, cudagraph_runtime_mode=CUDAGraphMode.PIECEWISE),
          pytest.raises(RuntimeError, match="static MoE output buffer")):
        a.quant_method.apply(a, x, w, ids, None, None)


def test_graph_rows_follow_the_capture_sizes():
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    from mxserve.vllm_plugin.offload_method import graph_rows
    v = _vcfg(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.PIECEWISE,
              cudagraph_capture_sizes=[1, 2, 4, 8, 16, 24, 32], max_cudagraph_capture_size=32)
    assert graph_rows(v) == 32
    v.model_config.enforce_eager = True
    assert graph_rows(v) == 0
    assert graph_rows(_vcfg(mode=CompilationMode.NONE, cudagraph_mode=CUDAGraphMode.NONE)) == 0


@pytest.mark.parametrize("field", ["shared_expert_intermediate_size", "n_shared_experts"])
def test_compilation_hook_keeps_shared_expert_models_eager(field, caplog):
    """``moe_forward_shared`` also returns the shared experts' output (a fresh tensor this method cannot place in a
    static buffer): PIECEWISE would feed the next graph piece a stale address, so the hook falls back to eager."""
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    from mxserve.scheduler.config import OffloadConfig
    from mxserve.vllm_plugin.offload_method import (
        OffloadSetupError,
        apply_compilation_hook,
    )
    v = _vcfg(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    v.model_config.hf_config = SimpleNamespace(**{field: 2})
    with pytest.raises(OffloadSetupError, match=f"shared experts \\({field}=2\\)"):
        apply_compilation_hook(v, OffloadConfig(allow_eager_fallback=False))
    with caplog.at_level(logging.WARNING, logger="mxserve"):
        assert apply_compilation_hook(v, OffloadConfig()) == "eager"
    assert v.model_config.enforce_eager and v.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    v = _vcfg(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    v.model_config.hf_config = SimpleNamespace(text_config=SimpleNamespace(**{field: 0}))
    assert apply_compilation_hook(v, OffloadConfig()) == "piecewise"
