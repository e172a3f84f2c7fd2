"""GPU tier (sm90): the Gluon int4 down-projection prototype (``moe.gluon_w4``) vs the fp32 reference of the same
dequantized weights, and vs the Triton grouped GEMM's MODE_DOWN on the same route.

Reference: ``out[r] = topk_w[r] * x[r] @ dequant_expert(w, e_r)^T`` in fp32 (``layout.dequant_expert`` is bit-exact
with ``quant.reference.dequantize``); tolerance ``GROUPED_GEMM_REL_MEAN[bf16]`` (relative mean absolute error).
"""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels._common.layout import dequant_expert, pack_projection
from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe.routing import moe_align
from tests.tolerances import GROUPED_GEMM_REL_MEAN, rel_mean_err
from tests.unit._kernel_cases import make_routing

pytestmark = pytest.mark.gpu


def _sm90() -> None:
    from mxserve_kernels.moe.gluon_w4 import gluon_available
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9 or not gluon_available():
        pytest.skip("the Gluon W4 prototype needs an sm90 GPU and triton.experimental.gluon")


def _down(e: int, h: int, i: int, schemes=("int4_g128_asym",), seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    experts = []
    for j in range(e):
        s = WeightScheme.parse(schemes[j % len(schemes)])
        experts.append((s, random_canonical(s, h, i, device="cuda", generator=g)))
    return pack_projection(experts, n=h, k=i, where="down")


def _skewed_routing(t: int, k: int, e: int, seed: int):
    """Zipf-like routing (expert j drawn with weight 1/(j+1)^1.5, distinct per token): a few hot experts with many
    rows (several m-blocks), a long tail with one or none."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, e + 1, dtype=torch.float64) ** 1.5
    ids = torch.stack([torch.multinomial(p, k, replacement=False, generator=g) for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    return (w / w.sum(-1, keepdim=True)).cuda(), ids.cuda()


def _reference(x: torch.Tensor, w, ids: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.n, dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    for e in flat.unique().tolist():
        r = torch.nonzero(flat == e).flatten()
        out[r] = (x[r].float() @ dequant_expert(w, e).t()) * tw.reshape(-1)[r, None].float()
    return out


def _run(t, k, e, h, i, routing, seed=0, schemes=("int4_g128_asym",)):
    from mxserve_kernels.moe.gluon_w4 import gluon_w4_down
    w = _down(e, h, i, schemes, seed)
    if routing == "skewed":
        tw, ids = _skewed_routing(t, k, e, seed)
    else:
        tw, ids = make_routing(t, k, e, routing, device="cuda", seed=seed)
    route = moe_align(ids, e, 16)
    x = torch.randn(t * k, i, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed + 1))
    x = x.to(torch.bfloat16)
    got = gluon_w4_down(x, w, route, tw)
    return w, x, route, tw, ids, got


@pytest.mark.parametrize("t", [1, 4, 16, 64])
@pytest.mark.parametrize("routing", ["random", "skewed", "skip_half", "one_expert"])
def test_gluon_w4_down_vs_reference(t, routing):
    _sm90()
    w, x, _, tw, ids, got = _run(t, 8, 32, 1024, 768, routing, seed=t)
    want = _reference(x, w, ids, tw)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


@pytest.mark.parametrize("t", [1, 4, 16, 64])
def test_gluon_w4_down_qwen3_shape_vs_triton(t):
    """Qwen3-30B-A3B down projection (E=128, H=2048, I=768, top-8): vs the reference and vs the Triton SWAP + ASM
    grouped GEMM on the same route (both round scale/zero and the weights to bf16 the same way)."""
    _sm90()
    from mxserve_kernels.moe.grouped_gemm import MODE_DOWN, grouped_gemm
    w, x, route, tw, ids, got = _run(t, 8, 128, 2048, 768, "random", seed=100 + t)
    want = _reference(x, w, ids, tw)
    assert rel_mean_err(want, got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "ASM": 1, "SWAP": 1}
    tri = grouped_gemm(x, w, cfg, mode=MODE_DOWN, route=route, topk_weights=tw, zero_init=True)
    assert rel_mean_err(tri.float(), got.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]


def test_gluon_w4_down_expert_without_weights_and_cuda_graph():
    """An expert with no weights (KIND_NONE: its rows stay 0, as in grouped_gemm) and CUDA-graph replay."""
    _sm90()
    from mxserve_kernels.moe.gluon_w4 import check_weights, gluon_w4_down
    w, x, route, tw, ids, _ = _run(16, 8, 16, 1024, 512, "random", seed=7)
    w.einfo[3, 0] = 0  # layout.KIND_NONE
    check_weights(w)
    want = _reference(x, w, ids, tw)
    out = gluon_w4_down(x, w, route, tw, checked=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replay = gluon_w4_down(x, w, route, tw, checked=True)
    graph.replay()
    torch.cuda.synchronize()
    dead = (ids.reshape(-1) == 3)
    assert dead.any() and torch.all(out[dead] == 0)
    assert rel_mean_err(want, out.float()) < GROUPED_GEMM_REL_MEAN[torch.bfloat16]
    assert torch.equal(out, replay)

