"""GPU: after ``mxserve_kernels.warmup`` a served layer compiles nothing new at any token count up to the max
(no JIT stall inside requests): a sweep of EVERY T up to the max after the warm-up; a failure names each new
binary's kernel and specialization (the CPU model of the keys: tests/unit/test_kernel_warmup_counts.py)."""
import pytest
import torch

from mxserve_kernels import warmup
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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


KERNELS = {"grouped_gemm_kernel": grouped_gemm_kernels, "dequant_kernel": grouped_gemm_kernels,
           "splitk_reduce_kernel": grouped_gemm_kernels, "moe_align_kernel": routing_kernels}


def _all_compiled() -> set[tuple]:
    """(kernel, specialization, options) of every binary compiled so far by the kernels a MoE / linear forward can
    launch (``JITFunction.device_caches[dev] = (kernel_cache, kernel_key_cache, ...)``, key cache keyed by
    ``(tuple(specialization), str(options))``)."""
    out = set()
    for name, mod in KERNELS.items():
        for kernel_cache, key_cache, *_ in getattr(mod, name).device_caches.values():
            out |= {(name, spec, opts) for (spec, opts), key in key_cache.items() if key in kernel_cache}
    return out


def _new_after(before: set[tuple], after: set[tuple]) -> str:
    """Which kernel and which specialization (non-pointer arguments) compiled after warm-up."""
    new = sorted(after - before, key=str)
    lines = [f"  {n}: " + " ".join(f"{a}{b}" if a != "constexpr" else f"={b}" for a, b in spec if not a.startswith("*"))
             + f" {opts}" for n, spec, opts in new]
    return f"{len(new)} kernel variants compiled after warm-up:\n" + "\n".join(lines)


@pytest.mark.parametrize("e,h,i,k,max_t,kinds", [
    (16, 256, 128, 4, 300, ["int4_g128_asym", "int2_g64_asym", "bf16"]),              # default config buckets
    (128, 2048, 768, 8, 320, ["int2_g128_asym", "int2_g128_asym", "int3_g128_asym"]),  # A3B: tuned FMA/split-K table
], ids=["default-configs", "a3b-tuned"])
def test_warm_moe_then_no_new_compiles(e, h, i, k, max_t, kinds):
    gate_up, down = make_experts(kinds, h, i, device="cuda")  # one weight per kind, shared by its experts (speed)
    w = prepare_experts([gate_up[x % len(kinds)] for x in range(e)], [down[x % len(kinds)] for x in range(e)],
                        hidden=h, inter=i, device="cuda")
    assert warmup.warm_moe(w, k, max_t) == len(warmup.moe_token_counts(w, k, max_t))
    assert warmup.warm_moe(w, k, max_t) == 0            # same signature: nothing run twice
    before = _all_compiled()
    print(f"\nwarm-up compiled {len(before)} binaries at T={warmup.moe_token_counts(w, k, max_t)}")
    for t in range(1, max_t + 1):                        # every T serving can run maps to a warmed binary
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        tw, ids = torch.topk(torch.rand(t, e, device="cuda"), k, dim=-1)
        fused_moe(x, w, tw.float(), ids.to(torch.int32))
    torch.cuda.synchronize()
    after = _all_compiled()
    assert after == before, _new_after(before, after)


def test_warm_linear_then_no_new_compiles():
    s = WeightScheme.parse("int4_g128_asym")
    g = torch.Generator(device="cuda").manual_seed(1)
    lw = prepare_linear(s, random_canonical(s, 384, 256, device="cuda", generator=g), k=256)
    assert warmup.warm_linear(lw, 200) == len(warmup.linear_token_counts(lw, 200))
    before = _all_compiled()
    for m in range(1, 201):
        dequant_linear(torch.randn(m, 256, device="cuda", dtype=torch.bfloat16), lw)
    torch.cuda.synchronize()
    after = _all_compiled()
    assert after == before, _new_after(before, after)
