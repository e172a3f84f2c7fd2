"""Offline proof of the SWAP K loop's code generation (no GPU needed): compile ``grouped_gemm_kernel`` for sm90 on
this machine (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, ptxas included) and read the TTGIR. With SWAP,
every tensor-core dot must be ``ttng.warp_group_dot`` whose A operand (the dequantized weights) is a register tensor
in the dot-operand layout, and no bf16 weight tile may be written to shared memory (``local_alloc``): only the
``[BKW, BLOCK_M]`` activation slices (wgmma's B) and the pipelined code-word / scale / zero / plane buffers go
through it. The same config without SWAP (negative control) runs ``mma.sync`` with the weights as B in shared memory.

The pointer and integer arguments carry the 16-divisibility Triton's launcher infers for real launches: without it
scale/zero loads are not pipelined and the compiler moves the layout conversion after the dequant."""
from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

NAMES = ["x_ptr", "out_ptr", "qw_ptr", "pw_ptr", "meta_ptr", "wbf_ptr", "einfo_ptr", "sorted_ids_ptr",
         "block_expert_ptr", "num_post_ptr", "topk_w_ptr", "N", "K", "wcols", "n_up", "stride_xm", "stride_om",
         "a_div", "num_valid", "k_split", "stride_ks"]
TYPES = ["*bf16", "*bf16", "*i32", "*i32", "*bf16", "*bf16", "*i64", "*i32", "*i32", "*i32", "*fp32"] + ["i32"] * 10


def compile_ttgir(kinds: int, asm: bool, swap: bool, block_n: int = 64, block_k: int = 16, mode: int = 1,
                  gscale: int = 0, ir: str = "ttgir") -> str:
    """sm90 TTGIR (or ``ir="ptx"``) of one grouped GEMM variant (BLOCK_M 16, 4 warps, 3 stages)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mxserve_kernels._common.layout import NFIELDS
    from mxserve_kernels.moe.grouped_gemm_kernels import grouped_gemm_kernel
    const = dict(MODE=mode, DENSE=False, NFIELDS=NFIELDS, IS_FP32=False, KINDS=kinds, BLOCK_M=16, BLOCK_N=block_n,
                 BLOCK_K=block_k, FMA=False, SPLIT_K=1, KT=False, ASM=asm, SWAP=swap, GSCALE=gscale)
    sig = dict(zip(NAMES, TYPES))
    sig.update({c: "constexpr" for c in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(NAMES)
             if n not in ("a_div", "num_valid", "stride_ks")}
    c = triton.compile(ASTSource(fn=grouped_gemm_kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    return c.asm[ir]


def _dots(ttgir: str) -> tuple[list[str], list[str]]:
    """(warp_group_dot A-operand types, tt.dot lines)."""
    wg = re.findall(r"ttng\.warp_group_dot %\S+, %\S+, %\S+.*?: (\S+?<[^>]*>>?|!ttg\.memdesc<[^>]*>)", ttgir)
    return wg, re.findall(r"= tt\.dot ", ttgir)


def _weight_allocs(ttgir: str, block_n: int, bkw: int) -> list[str]:
    """local_allocs of a bf16 [BLOCK_N, BKW] register tile (a dequantized weight slot going to shared memory)."""
    return re.findall(rf"ttg\.local_alloc %\S+ : \(tensor<{block_n}x{bkw}xbf16", ttgir)


# (KINDS mask, ASM): 4-bit ASM, 2-bit ASM, int3 ASM (parity sub-steps), generic 4-bit / 2-bit / int3 / 8-bit.
# Not here (documented in docs/kernels.md): nested experts (the compiler leaves their dequant in a blocked layout,
# so their tiles still cross shared memory) and int1 (runtime slot loop).
CASES = [(8, True), (4, True), (32, True), (8, False), (4, False), (32, False), (16, False)]


@pytest.mark.parametrize("kinds,asm", CASES, ids=[f"kinds{k}_asm{int(a)}" for k, a in CASES])
def test_swap_weights_are_wgmma_register_operand(kinds, asm):
    ttgir = compile_ttgir(kinds, asm, swap=True)
    wg, plain = _dots(ttgir)
    assert wg and not plain, "SWAP with BLOCK_N 64 must lower every dot to warp_group_dot"
    assert all("dot_op<{opIdx = 0" in t for t in wg), f"A operand not in registers: {set(wg)}"
    assert not _weight_allocs(ttgir, 64, 16), "a dequantized weight tile goes through shared memory"
    # the code words reach the dequant straight from the pipelined buffer, in the dot-operand layout
    assert re.search(r"ttg\.local_load .* -> tensor<64x16xi32, #ttg\.dot_op<\{opIdx = 0", ttgir)


def test_without_swap_weights_go_through_shared_memory():
    """Negative control (the checks above can fail): the per-slot loop without SWAP keeps BLOCK_M 16 on mma.sync
    with the dequantized weights stored to shared memory every code slot."""
    ttgir = compile_ttgir(8, True, swap=False, block_n=64)
    wg, plain = _dots(ttgir)
    assert plain and not wg
    assert re.findall(r"ttg\.local_alloc %\S+ : \(tensor<16x64xbf16", ttgir)


@pytest.mark.parametrize("asm", [True, False], ids=["asm1", "asm0"])
def test_gscale_keeps_register_a_without_scale_tiles(asm):
    """GSCALE (int4): still register-A ``warp_group_dot`` with no bf16 weight tile in shared memory; the only
    operand-layout local_loads are the i32 code words (no ``[BN, BKW]`` scale/zero tiles any more: they are
    ``[BN]`` vectors loaded in the accumulator's slice layout), and no ``fma.rn.bf16x2`` is left in the PTX."""
    ttgir = compile_ttgir(8, asm, swap=True, gscale=8)
    wg, plain = _dots(ttgir)
    assert wg and not plain and all("dot_op<{opIdx = 0" in t for t in wg), set(wg)
    assert not _weight_allocs(ttgir, 64, 16)
    loads = set(re.findall(r"ttg\.local_load .* -> (tensor<[^,]*),", ttgir))
    assert loads == {"tensor<64x16xi32"}, loads
    assert re.search(r"tt\.load .* : tensor<64x!tt\.ptr<bf16>, #ttg\.slice<\{dim = 1, parent = #mma", ttgir)
    ptx = compile_ttgir(8, asm, swap=True, gscale=8, ir="ptx")
    assert "fma.rn.bf16x2" not in ptx and "wgmma.mma_async" in ptx


def test_gscale_off_keeps_scale_tiles():
    """Negative control for the check above: the same config without GSCALE still reads bf16 scale/zero tiles in
    the operand layout and dequantizes with fma.rn.bf16x2."""
    ttgir = compile_ttgir(8, True, swap=True, gscale=0)
    assert "tensor<64x16xbf16" in " ".join(re.findall(r"ttg\.local_load .* -> (tensor<[^,]*),", ttgir))
    assert "fma.rn.bf16x2" in compile_ttgir(8, True, swap=True, gscale=0, ir="ptx")
