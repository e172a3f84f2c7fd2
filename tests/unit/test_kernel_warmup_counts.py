"""``mxserve_kernels.warmup``: the token counts warmed at load compile every Triton binary a sweep T = 1..max can
launch. Checked on CPU against Triton's OWN key function: the launchers run (TRITON_INTERPRET=1 selects the Triton
path) with each ``@triton.jit`` kernel replaced by a recorder that binds the real launch arguments with the binder
``JITFunction.run`` uses (``create_function_from_signature`` + ``native_specialize_impl``, CUDA sm90 backend) and
keeps (kernel, specialization, options) instead of launching. Outputs are garbage; no launcher reads them back."""
from __future__ import annotations

import collections
import json

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from mxserve_kernels import warmup
from mxserve_kernels._common import configs
from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe import (
    fused_moe,
    grouped_gemm_kernels,
    prepare_experts,
    routing_kernels,
)
from mxserve_kernels.quant import dequant_linear, prepare_linear
from tests.unit._kernel_cases import make_experts

KERNELS = [(grouped_gemm_kernels, "grouped_gemm_kernel"), (grouped_gemm_kernels, "dequant_kernel"),
           (grouped_gemm_kernels, "splitk_reduce_kernel"), (routing_kernels, "moe_align_kernel")]
E, H, I = 16, 256, 128


class _Recorder:
    """Stands in for one ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the compile key."""

    def __init__(self, name: str, kernel, log: set, backend):
        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        self.name, self.log = name, log
        self.binder = create_function_from_signature(jit.signature, jit.params, backend)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            _, spec, options = self.binder(*args, **kw)
            self.log.add((self.name, tuple(spec), tuple(sorted(options.items()))))
        return launch


@pytest.fixture
def keys_at(monkeypatch):
    """keys_at(fn) -> the set of (kernel, specialization, options) that ``fn()`` launches."""
    log: set = set()
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for mod, name in KERNELS:
        monkeypatch.setattr(mod, name, _Recorder(name, getattr(mod, name), log, backend))
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def run(fn) -> frozenset:
        log.clear()
        with torch.no_grad():
            fn()
        return frozenset(log)
    return run


def _moe_forward(w, k, t, expert_map=None, ids_dtype=torch.int32):
    e_ids = w.num_experts if expert_map is None else expert_map.numel()
    x = torch.zeros(t, w.hidden, dtype=torch.bfloat16)
    return lambda: fused_moe(x, w, torch.full((t, k), 1.0 / k), warmup._spread_ids(t, k, e_ids, "cpu", ids_dtype),
                             expert_map=expert_map)


def _describe(key) -> str:
    """kernel + its non-pointer specialization (what differs between variants of one kernel)."""
    name, spec, _ = key
    return f"{name} " + " ".join(f"{a}{b}" if a != "constexpr" else f"={b}" for a, b in spec if not a.startswith("*"))


def _check_cover(per_t: dict[int, frozenset], chosen: list[int], label: str) -> None:
    everything = frozenset().union(*per_t.values())
    warmed = frozenset().union(*(per_t[t] for t in chosen))
    missing = everything - warmed
    counts = collections.Counter(k[0] for k in everything)
    seen: set = set()
    needed = [t for t in sorted(per_t) if not per_t[t] <= seen and not seen.update(per_t[t])]
    print(f"\n{label}: sweep T=1..{max(per_t)} compiles {len(everything)} binaries {dict(counts)}; "
          f"warm-up runs T={chosen}" + ("" if chosen == needed else f" (exact key model would run T={needed})"))
    first = {k: min(t for t, ks in per_t.items() if k in ks) for k in missing}
    assert not missing, f"{label}: {len(missing)} binaries not compiled by warm-up:\n" + "\n".join(
        f"  first at T={first[k]}: {_describe(k)}" for k in sorted(missing, key=first.get))


def _experts(kinds=("int4_g128_asym", "int2_g64_asym", "bf16")):
    return prepare_experts(*make_experts([kinds[x % len(kinds)] for x in range(E)], H, I), hidden=H, inter=I)


def test_default_configs_sweep_compiles_nothing_beyond_warmup(keys_at):
    w, k, max_t = _experts(), 4, 300  # the GPU test's geometry: default buckets, prefill dequant from T = 192
    per_t = {t: keys_at(_moe_forward(w, k, t)) for t in range(1, max_t + 1)}
    chosen = warmup.moe_token_counts(w, k, max_t)
    assert chosen[0] == 1 and chosen == sorted(set(chosen)) and chosen[-1] <= max_t
    _check_cover(per_t, chosen, "default configs")
    with pytest.raises(AssertionError, match=r"first at T=\d+: \w+_kernel"):  # the check has teeth: T=1 alone
        _check_cover(per_t, [1], "T=1 only")

def test_tuned_fma_splitk_table_and_top1_with_expert_map(keys_at, tmp_path, monkeypatch):
    def cfg(bm, bn, bk, fma=0, sk=1, **kw):
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": 3, "FMA": fma,
                "SPLIT_K": sk, **kw}
    table = {"1": {"w13": cfg(1, 32, 16, 1, 2), "w2": cfg(1, 32, 16, 1)},
             "8": {"w13": cfg(4, 32, 16, 1, 4), "w2": cfg(4, 32, 16, 1, 2)},
             "40": {"w13": cfg(16, 32, 32, sk=2, KT=1), "w2": cfg(16, 64, 16)},
             "160": {"w13": cfg(64, 128, 32), "w2": cfg(64, 128, 32)},
             "200": {"w13": cfg(64, 128, 32, INLOOP=1, KT=1), "w2": cfg(64, 128, 32, INLOOP=1)},  # no prefill dequant
             "240": {"w13": cfg(64, 128, 32), "w2": cfg(64, 64, 32)}}
    path = tmp_path / configs.config_filename({"E": E, "H": H, "I": I}, configs.device_name())
    path.write_text(json.dumps(table))
    monkeypatch.setattr(configs, "CONFIG_DIR", str(tmp_path))
    w = _experts(("int4_g128_asym", "int3_g64_asym"))
    emap = torch.tensor([x // 2 if x % 2 == 0 else -1 for x in range(2 * E)], dtype=torch.int32)
    for k, em, max_t in ((4, None, 260), (1, emap, 200)):
        per_t = {t: keys_at(_moe_forward(w, k, t, em)) for t in range(1, max_t + 1)}
        assert any(key[0] == "splitk_reduce_kernel" for key in per_t[1])  # the table's split-K really ran
        _check_cover(per_t, warmup.moe_token_counts(w, k, max_t, has_map=em is not None),
                     f"tuned table K={k} expert_map={em is not None}")


def test_linear_sweep_compiles_nothing_beyond_warmup(keys_at, tmp_path, monkeypatch):
    s = WeightScheme.parse("int4_g128_asym")
    lw = prepare_linear(s, random_canonical(s, 384, 256, generator=torch.Generator().manual_seed(1)), k=256)
    table = {"1": {"w": {"BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "FMA": 1,
                         "SPLIT_K": 4}}}
    for tuned in (False, True):
        if tuned:
            (tmp_path / configs.config_filename({"E": 1, "N": 384, "K": 256}, configs.device_name())).write_text(
                json.dumps({**table, "96": {"w": dict(configs.default_config(96))}}))
            monkeypatch.setattr(configs, "CONFIG_DIR", str(tmp_path))
        per_t = {m: keys_at(lambda m=m: dequant_linear(torch.zeros(m, 256, dtype=torch.bfloat16), lw))
                 for m in range(1, 201)}
        _check_cover(per_t, warmup.linear_token_counts(lw, 200), f"linear tuned={tuned}")


def test_counts_reject_bad_max_and_warmup_is_a_noop_on_cpu():
    s = WeightScheme.parse("int4_g128_asym")
    lw = prepare_linear(s, random_canonical(s, 32, 128, generator=torch.Generator().manual_seed(0)), k=128)
    with pytest.raises(ValueError, match="max_tokens"):
        warmup.linear_token_counts(lw, 0)
    assert warmup.linear_token_counts(lw, 1) == [1]
    assert warmup.warm_linear(lw, 64) == 0
    assert warmup.warm_moe(_experts(), 2, 64) == 0
