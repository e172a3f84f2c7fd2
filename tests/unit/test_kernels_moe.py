"""MoE kernels on CPU: runtime layout bit-exact vs the canonical oracle, routing metadata, the reference vs a
per-token loop, and the Triton grouped GEMM under TRITON_INTERPRET=1 on tiny shapes with named edge cases."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mxserve_kernels._common.layout import (F_KIND, F_NPLANES, F_PMOFF, F_PMSTEP, F_POFF, F_PWSTEP, KIND_NESTED,
                                            OFF_UNIT, PackedWeights, dequant_expert, pack_projection)
from mxserve_kernels.moe import MoEWeights, fused_moe, moe_align, prepare_experts
from mxserve_kernels.moe import reference as moe_ref
from mxserve_kernels.quant import reference as qref
from tests.tolerances import BIT_EXACT, GROUPED_GEMM_REL_MEAN, rel_mean_err
from tests.unit._kernel_cases import make_experts, make_routing

ALL_SCHEMES = ["int2_g32_asym", "int3_g64_sym", "int4_g32_asym", "int8_g32_sym_fp16", "bf16",
               "int2_g32_asym_nested3", "int2_g32_asym_nested4", "int1_g32_asym", "int2_g32_asym_nested2",
               "int4_g128_sym", "int3_g32_asym", "int8_g64_asym", "int1_g128_asym_fp16"]


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_runtime_layout_dequant_bit_exact(name):
    gate_up, _ = make_experts([name], hidden=128, inter=128)
    s, t = gate_up[0]
    pw = pack_projection([(s, t)], n=256, k=128)
    torch.testing.assert_close(dequant_expert(pw, 0), qref.dequantize(s, t, 128), **BIT_EXACT)


def relocate_planes(pw: PackedWeights) -> PackedWeights:
    """The same projection with every nested expert's plane scales and sign planes moved to a new region at the end
    of ``meta`` / ``pw``, in reverse plane order with gaps (PMOFF / PWSTEP / PMSTEP differ from ``pack_projection``'s
    defaults; the steps are negative), and the old locations overwritten with garbage (a kernel still reading
    ``MOFF + 2*(K/G)*N`` or ``POFF + i*(K/32)*N`` gives wrong results)."""
    info, meta, pws = pw.einfo.clone(), [pw.meta.clone()], [pw.pw.clone()]
    mlen, plen = meta[0].numel(), pws[0].numel()
    for e in range(info.shape[0]):
        npl = int(info[e, F_NPLANES])
        if int(info[e, F_KIND]) != KIND_NESTED:
            continue
        pmoff, pmstep, pwstep = int(info[e, F_PMOFF]), int(info[e, F_PMSTEP]), int(info[e, F_PWSTEP])
        poff = int(info[e, F_POFF]) * OFF_UNIT
        step_m = pmstep + 3
        step_p = -(-(pwstep + 48) // OFF_UNIT) * OFF_UNIT     # plane starts stay OFF_UNIT-aligned
        rm = torch.full((npl * step_m,), -7.0, dtype=pw.meta.dtype)
        rp = torch.zeros(npl * step_p, dtype=pw.pw.dtype)
        for i in range(npl):
            j = npl - 1 - i                                   # reverse order
            rm[j * step_m: j * step_m + pmstep] = meta[0][pmoff + i * pmstep: pmoff + (i + 1) * pmstep]
            rp[j * step_p: j * step_p + pwstep] = pws[0][poff + i * pwstep: poff + (i + 1) * pwstep]
            meta[0][pmoff + i * pmstep: pmoff + (i + 1) * pmstep] = 1e3
            pws[0][poff + i * pwstep: poff + (i + 1) * pwstep] = 0x5A5A5A5A
        info[e, F_PMOFF], info[e, F_PMSTEP] = mlen + (npl - 1) * step_m, -step_m
        info[e, F_POFF], info[e, F_PWSTEP] = (plen + (npl - 1) * step_p) // OFF_UNIT, -step_p
        meta.append(rm)
        pws.append(rp)
        mlen += rm.numel()
        plen += rp.numel()
    return PackedWeights(pw.qw, torch.cat(pws), torch.cat(meta), pw.wbf, info, pw.n, pw.k)


@pytest.mark.parametrize("names", [["int2_g32_asym_nested4", "int4_g32_asym", "int2_g64_asym_fp16_nested3"],
                                   ["int2_g32_asym_nested3", "int2_g32_asym_nested4"]])
def test_plane_offsets_from_einfo(names):
    """dequant_expert reads plane scales / planes through PMOFF, PWSTEP, PMSTEP (not MOFF + 2*(K/G)*N)."""
    gate_up, _ = make_experts(names, hidden=192, inter=64)
    pw = relocate_planes(pack_projection(gate_up, n=128, k=192))
    for e, (s, t) in enumerate(gate_up):
        torch.testing.assert_close(dequant_expert(pw, e), qref.dequantize(s, t, 192), **BIT_EXACT)


def test_mixed_scale_dtypes_share_fp32_meta():
    gate_up, _ = make_experts(["int4_g32_asym", "int4_g32_asym_fp16"], hidden=64, inter=32)
    pw = pack_projection(gate_up, n=64, k=64)
    assert pw.meta.dtype == torch.float32
    for e, (s, t) in enumerate(gate_up):
        torch.testing.assert_close(dequant_expert(pw, e), qref.dequantize(s, t, 64), **BIT_EXACT)


def test_prepare_errors_name_the_tensor():
    gate_up, down = make_experts(["int4_g32_asym"], hidden=64, inter=32)
    del gate_up[0][1]["zeros"]
    with pytest.raises(ValueError, match=r"gate_up\[expert 0\].*zeros"):
        prepare_experts(gate_up, down, hidden=64, inter=32)
    gate_up, down = make_experts(["int4_g32_asym"], hidden=64, inter=32)
    down[0][1]["scales"] = down[0][1]["scales"][:-1]
    with pytest.raises(ValueError, match=r"down\[expert 0\]\.scales"):
        prepare_experts(gate_up, down, hidden=64, inter=32)


def test_weights_tensors_roundtrip():
    w = prepare_experts(*make_experts(["int4_g32_asym", "bf16"], hidden=64, inter=32), hidden=64, inter=32)
    w2 = MoEWeights.from_tensors(w.tensors(), hidden=64, inter=32).to("cpu")
    for name, tensor in w.tensors().items():
        assert torch.equal(tensor, w2.tensors()[name]), name


@pytest.mark.parametrize("t,k,e,block_m,use_map", [(1, 1, 4, 16, False), (7, 3, 5, 16, False), (33, 4, 4, 16, False),
                                                   (5, 2, 6, 32, True)])
def test_moe_align_matches_loop(t, k, e, block_m, use_map):
    _, ids = make_routing(t, k, e, "random")
    emap = torch.tensor([i // 2 if i % 2 == 0 else -1 for i in range(e)]) if use_map else None
    r = moe_align(ids, (e + 1) // 2 if use_map else e, block_m, emap)
    local = emap[ids] if use_map else ids
    flat = local.reshape(-1)
    num_post = int(r.num_post)
    assert num_post % block_m == 0
    seen = []
    for b in range(num_post // block_m):
        ex = int(r.block_expert[b])
        rows = r.sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < t * k].tolist()
        assert all(int(flat[p]) == ex for p in rows)
        seen += rows
    assert sorted(seen) == sorted(i for i in range(t * k) if int(flat[i]) >= 0)
    assert (r.block_expert[num_post // block_m:] == -1).all()


def _loop_reference(x, gate_up, down, tw, ids, hidden, inter):
    """Independent oracle: per (token, slot), canonical dequantize -> fp32 MLP."""
    out = torch.zeros(x.shape[0], hidden)
    for ti in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[ti, j])
            if e < 0:
                continue
            w13 = qref.dequantize(*gate_up[e], hidden)
            h = w13 @ x[ti].float()
            a = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[ti] += tw[ti, j] * (qref.dequantize(*down[e], inter) @ a)
    return out


def test_reference_matches_per_token_loop():
    schemes = ["int2_g32_asym", "int3_g64_sym", "bf16", "int2_g32_asym_nested4"]
    gate_up, down = make_experts(schemes, hidden=64, inter=64)
    w = prepare_experts(gate_up, down, hidden=64, inter=64)
    tw, ids = make_routing(6, 2, 4, "random")
    x = torch.randn(6, 64)
    got = moe_ref.fused_moe(x, w, tw, ids)
    want = _loop_reference(x, gate_up, down, tw, ids, 64, 64)
    assert rel_mean_err(want, got) < GROUPED_GEMM_REL_MEAN[torch.float32]


def test_triton_kernels_under_interpreter():
    """The Triton kernels on CPU: tests/unit/interp_kernels.py in a subprocess with TRITON_INTERPRET=1 (Triton reads
    the variable when its own language module is imported, so it cannot be switched on inside this process)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    path = os.path.join(os.path.dirname(__file__), "interp_kernels.py")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(path))),
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from mxserve_kernels.moe.grouped_gemm import MODE_GATE_UP, grouped_gemm
    from mxserve_kernels.moe.routing import max_padded_rows
    w = prepare_experts(*make_experts(["int4_g32_asym", "bf16"], hidden=64, inter=32), hidden=64, inter=32)
    tw, ids = make_routing(3, 2, 2, "random")
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 64, dtype=torch.bfloat16)
        r = moe_align(ids, 2, 16)
        h = grouped_gemm(x, w.w13, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
                         mode=MODE_GATE_UP, route=r, a_div=2)
        assert h.shape == (6, 32) and h.dtype == torch.bfloat16
        sid, bexp, npost = torch.ops.mxserve.moe_align(torch.empty(3, 2, dtype=torch.int64), None, 4, 16)
        rows = max_padded_rows(6, 4, 16)
        assert sid.shape == (rows,) and bexp.shape == (rows // 16,) and npost.shape == (1,)
        assert sid.dtype == bexp.dtype == npost.dtype == torch.int32
        d = torch.ops.mxserve.dequant_bf16(w.w13.qw, w.w13.pw, w.w13.meta, w.w13.wbf, w.w13.einfo, 64, 64, 3)
        assert d.shape == (2, 64, 64) and d.dtype == torch.bfloat16


def test_cpu_falls_back_to_reference():
    w = prepare_experts(*make_experts(["int4_g32_asym", "bf16"], hidden=64, inter=32), hidden=64, inter=32)
    tw, ids = make_routing(3, 2, 2, "random")
    x = torch.randn(3, 64)
    torch.testing.assert_close(fused_moe(x, w, tw, ids), moe_ref.fused_moe(x, w, tw, ids), **BIT_EXACT)
    with pytest.raises(ValueError, match="activation"):
        fused_moe(x, w, tw, ids, activation="gelu")
