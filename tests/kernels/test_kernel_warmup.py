"""GPU: after ``mxserve_kernels.warmup`` a served layer compiles nothing new at any token count up to the max
(no JIT stall inside requests); plus the CPU-side contract of ``token_counts``."""
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


def _compiled(fn) -> int:
    return sum(len(c[0]) for c in fn.device_caches.values())


def _all_compiled() -> int:
    """Compiled binaries of every Triton kernel a MoE / linear forward can launch."""
    return sum(_compiled(f) for f in (grouped_gemm_kernels.grouped_gemm_kernel, grouped_gemm_kernels.dequant_kernel,
                                      grouped_gemm_kernels.splitk_reduce_kernel, routing_kernels.moe_align_kernel))


def test_warm_moe_then_no_new_compiles():
    e, h, i, k, max_t = 16, 256, 128, 4, 300
    kinds = ["int4_g128_asym", "int2_g64_asym", "bf16"]
    w = prepare_experts(*make_experts([kinds[x % 3] for x in range(e)], h, i, device="cuda"), hidden=h, inter=i)
    assert warmup.warm_moe(w, k, max_t) == len(warmup.token_counts(max_t))
    assert warmup.warm_moe(w, k, max_t) == 0            # same signature: nothing run twice
    before = _all_compiled()
    for t in (1, 2, 3, 5, 17, 64, 100, 255, 300):        # counts between the warmed ones map to warmed variants
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
        tw, ids = torch.topk(torch.rand(t, e, device="cuda"), k, dim=-1)
        fused_moe(x, w, tw.float(), ids.to(torch.int32))
    torch.cuda.synchronize()
    after = _all_compiled()
    assert after == before, f"{after - before} kernel variants compiled after warm-up"


def test_warm_linear_then_no_new_compiles():
    s = WeightScheme.parse("int4_g128_asym")
    g = torch.Generator(device="cuda").manual_seed(1)
    lw = prepare_linear(s, random_canonical(s, 384, 256, device="cuda", generator=g), k=256)
    assert warmup.warm_linear(lw, 200) == len(warmup.token_counts(200))
    before = _all_compiled()
    for m in (1, 7, 33, 150, 200):
        dequant_linear(torch.randn(m, 256, device="cuda", dtype=torch.bfloat16), lw)
    torch.cuda.synchronize()
    after = _all_compiled()
    assert after == before, f"{after - before} kernel variants compiled after warm-up"
