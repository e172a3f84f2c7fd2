"""Offline proof (no GPU) of the Gluon int4 down-projection prototype's code generation for sm90: compile
``gluon_w4_kernels.gluon_w4_down_kernel`` with ``GluonASTSource`` for ``GPUTarget("cuda", 90, 32)`` on this machine
and read the TTGIR / PTX.

Measured (Triton 3.6, W4 down K = 768, BN 64, BM 16, 4 warps), PTX of the K-loop body = one 128-row step:
Gluon 8 ``wgmma.mma_async`` (m64n16k16, A from registers), 1 ``wgmma.wait_group``, 0 ``bar.sync``, no shared-memory
access at all; the Triton SWAP + ASM loop (``grouped_gemm_kernel``, BLOCK_K 16) on the same shape: 8 wgmma, 8
waits, 16 ``bar.sync`` (negative control below: the same counters must read higher there).
"""
from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

NAMES = ["x_ptr", "out_ptr", "qw_ptr", "meta_ptr", "einfo_ptr", "sorted_ids_ptr", "block_expert_ptr", "num_post_ptr",
         "topk_w_ptr", "N", "stride_xm", "stride_om", "num_valid"]
TYPES = ["*bf16", "*bf16", "*i32", "*bf16", "*i64", "*i32", "*i32", "*i32", "*fp32", "i32", "i32", "i32", "i32"]
K_DOWN = 768  # Qwen3-30B-A3B moe_intermediate_size: 6 steps


def _gluon():
    """(GluonASTSource, GPUTarget, kernels module) or skip when this Triton has no usable Gluon."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource

        from mxserve_kernels.moe import gluon_w4_kernels
    except (ImportError, AttributeError) as exc:  # Triton without Gluon / without its Hopper ops
        pytest.skip(f"Gluon unavailable: {type(exc).__name__}: {exc}")
    return GluonASTSource, GPUTarget, gluon_w4_kernels


def compile_gluon(k: int = K_DOWN) -> dict[str, str]:
    """sm90 ``{"ttgir": ..., "ptx": ...}`` of the prototype (the launcher's 16-divisibility on pointers/ints)."""
    source, target, mod = _gluon()
    sig = dict(zip(NAMES, TYPES))
    sig.update(K="constexpr", NFIELDS="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(NAMES) if n != "num_valid"}
    c = triton.compile(source(fn=mod.gluon_w4_down_kernel, signature=sig, constexprs={"K": k, "NFIELDS": 11},
                              attrs=attrs), target=target("cuda", 90, 32), options={"num_warps": 4})
    return {"ttgir": c.asm["ttgir"], "ptx": c.asm["ptx"]}


def loop_body(ptx: str) -> str:
    """The PTX of the (single) innermost loop: from its ``Inner Loop Header`` label to the back-edge branch."""
    heads = re.findall(r"^(\$L__\w+):\s*// =>This Inner Loop Header", ptx, flags=re.MULTILINE)
    assert len(heads) == 1, f"expected one innermost loop, found {heads}"
    start = ptx.index(heads[0] + ":")
    end = ptx.index(f"bra \t{heads[0]};", start) if f"bra \t{heads[0]};" in ptx else ptx.rindex(heads[0])
    return ptx[start:end]


def counts(body: str) -> dict[str, int]:
    """Per-step synchronisation / MMA counters of a loop body."""
    return {"wgmma": len(re.findall(r"wgmma\.mma_async", body)), "wait": len(re.findall(r"wgmma\.wait_group", body)),
            "bar": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", body)),
            "shared": len(re.findall(r"\b(?:st|ld|ldmatrix|stmatrix)[.\w]*\.shared", body))}


@pytest.fixture(scope="module")
def gluon_ir():
    return compile_gluon()


def test_gluon_step_is_one_k128_wgmma_chain(gluon_ir):
    c = counts(loop_body(gluon_ir["ptx"]))
    assert c["wgmma"] == 128 // 16, c  # K rows per step / 16: one m64n16k16 per code slot, all in one chain
    assert c["wait"] <= 1 and c["bar"] <= 2, c
    assert c["shared"] == 0, c  # activations staged once before the loop; weights never leave registers
    # the wgmmas take A from registers: {4 x b32} fragments, not a shared-memory descriptor
    assert len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n16k16\.f32\.bf16\.bf16 \{[^}]*\}, \{[^}]*\}",
                          gluon_ir["ptx"])) == 8


def test_gluon_weight_tile_never_in_shared_memory(gluon_ir):
    ttgir = gluon_ir["ttgir"]
    dots = re.findall(r"ttng\.warp_group_dot %\S+, %\S+, %\S+.*?: (tensor<[^>]*>>?)", ttgir)
    assert dots and all("64x128xbf16, #ttg.dot_op<{opIdx = 0" in t for t in dots), dots
    allocs = re.findall(r"ttg\.local_alloc.*?-> !ttg\.memdesc<([^,]*)", ttgir)
    assert allocs == [f"{K_DOWN // 128}x128x16xbf16"], allocs  # only the activation staging buffer
    # the slot-major join reaches the dot operand layout by a register renaming only (no local memory round trip)
    assert "ttg.local_load" not in ttgir and "ttg.local_store" in ttgir


def test_triton_swap_baseline_syncs_more():
    """Negative control: the Triton SWAP + ASM loop on the same W4 down shape pays a wait and barriers per slot,
    so the per-step bounds above fail there."""
    _gluon()
    from tests.unit.test_moe_swap_ir import compile_ttgir
    c = counts(loop_body(compile_ttgir(8, True, swap=True, block_n=64, block_k=16, mode=2, ir="ptx")))
    assert c["wgmma"] == 8
    assert c["wait"] > 1 and c["bar"] > 2, c


def test_wrong_word_layout_is_a_compile_error():
    """Negative control of the layout argument: words laid out with the lanes' word / row bases swapped cannot be
    joined into the A fragment without data movement, and ``_a_tile``'s trivial-conversion assert says so."""
    source, target, mod = _gluon()
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    good = mod.WORD_LAYOUT.value
    bad = gl.DistributedLinearLayout(reg_bases=good.reg_bases, lane_bases=[[1, 0], [2, 0], [0, 2], [0, 4], [4, 0]],
                                     warp_bases=good.warp_bases, block_bases=[], shape=good.shape)

    @gluon.jit
    def probe(w_ptr, o_ptr, LAYOUT: gl.constexpr):
        n = gl.arange(0, 64, layout=gl.SliceLayout(1, LAYOUT))
        w = gl.arange(0, 16, layout=gl.SliceLayout(0, LAYOUT))
        words = gl.load(w_ptr + n[:, None] * 16 + w[None, :])
        s = gl.load(o_ptr + n)
        a = mod._a_tile(words, s, s)
        gl.store(o_ptr + gl.arange(0, 64, layout=gl.SliceLayout(1, mod.A_LAYOUT.value))[:, None] * 0 + 64 +
                 gl.arange(0, 128, layout=gl.SliceLayout(0, mod.A_LAYOUT.value))[None, :], a)

    def build(layout):
        return triton.compile(source(fn=probe, signature={"w_ptr": "*i32", "o_ptr": "*bf16", "LAYOUT": "constexpr"},
                                     constexprs={"LAYOUT": layout}), target=target("cuda", 90, 32),
                              options={"num_warps": 4})

    build(good)  # the kernel's layout: fine
    with pytest.raises(Exception) as err:  # Triton's CompilationError wraps _a_tile's TypeError
        build(bad)
    assert "not trivial" in f"{err.value} {err.value.__cause__}"


def test_launcher_rejects_what_the_prototype_does_not_compute():
    """``check_weights`` names the offending expert (int2, int4 g64) and the shape; int4 g128 and empty experts pass."""
    import torch

    from mxserve_kernels._common.layout import pack_projection
    from mxserve_kernels._common.synth import random_canonical
    from mxserve_kernels.formats import WeightScheme
    from mxserve_kernels.moe.gluon_w4 import check_weights

    def proj(names, n=64, k=256):
        g = torch.Generator().manual_seed(0)
        return pack_projection([(WeightScheme.parse(s), random_canonical(WeightScheme.parse(s), n, k, generator=g))
                                for s in names], n=n, k=k)

    ok = proj(["int4_g128_asym", "int4_g128_sym"])
    ok.einfo[1, 0] = 0  # KIND_NONE
    check_weights(ok)
    for bad, expert in ((["int4_g128_asym", "int2_g128_asym"], 1), (["int4_g64_asym"], 0)):
        with pytest.raises(ValueError, match=f"expert {expert} "):
            check_weights(proj(bad))
    with pytest.raises(ValueError, match="N % 64"):
        check_weights(proj(["int4_g128_asym"], n=32))
