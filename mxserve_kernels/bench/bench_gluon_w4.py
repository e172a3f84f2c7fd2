"""Benchmark (not a test): the Gluon int4 down-projection prototype vs our Triton grouped GEMM down projection.

    python -m mxserve_kernels.bench.bench_gluon_w4 --json OUT.json [--tokens 1,4,16,64] [--shape qwen3-30b-a3b]

Same weights (every expert int4 g128 asym), same route (BLOCK_M 16), same activations; each method captured in a
CUDA graph and timed over a cold L2 (``bench_moe._bench``). Triton configs: the tuned / default down config of
``fused_moe.moe_config`` (its own route when its BLOCK_M is not 16) and the fixed SWAP + ASM config (BN 64, BK 16,
4 warps) on the prototype's route. Per T: microseconds, GB/s of the weight bytes touched, and max |diff| vs Triton.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from mxserve_kernels._common import configs
from mxserve_kernels._common.configs import write_json_atomic
from mxserve_kernels._common.layout import pack_projection
from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.bench.bench_moe import SHAPES, _bench
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.moe.grouped_gemm import MODE_DOWN, grouped_gemm
from mxserve_kernels.moe.routing import moe_align

SWAP_CFG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3, "ASM": 1, "SWAP": 1}


def _tuned_down_cfg(e: int, h: int, i: int, t: int, k: int) -> dict[str, int]:
    """The down config ``fused_moe.moe_config`` would pick for int4 experts (tuned file, else the default)."""
    entry = configs.lookup({"E": e, "H": h, "I": i}, t, bits=4)
    if entry is not None and "w2" in entry:
        return dict(entry["w2"])
    return configs.default_config(t * k / max(e, 1))


def bench_shape(shape: str, tokens: list[int], seed: int = 0) -> list[dict]:
    """Rows of results for one model shape (down projection [H, I] per expert)."""
    from mxserve_kernels.moe.gluon_w4 import check_weights, gluon_w4_down
    s = SHAPES[shape]
    e, h, i, k = s["E"], s["H"], s["I"], s["K"]
    scheme = WeightScheme.parse("int4_g128_asym")
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = pack_projection([(scheme, random_canonical(scheme, h, i, device="cuda", generator=g)) for _ in range(e)],
                        n=h, k=i, where="down")
    check_weights(w)
    rows = []
    for t in tokens:
        ids = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(t)])
        tw = torch.softmax(torch.randn(t, k, device="cuda"), -1)
        x = torch.randn(t * k, i, device="cuda").to(torch.bfloat16)
        route = moe_align(ids, e, 16)
        tuned = _tuned_down_cfg(e, h, i, t, k)
        t_route = route if tuned["BLOCK_M"] == 16 else moe_align(ids, e, tuned["BLOCK_M"])
        used = ids.unique().numel()
        wbytes = w.weight_bytes(ids.unique().tolist())
        res = {"shape": shape, "T": t, "experts_used": used, "weight_bytes": wbytes, "tuned_cfg": tuned}
        runs = {
            "gluon_w4": lambda x=x, r=route, tw=tw: gluon_w4_down(x, w, r, tw, checked=True),
            "triton_tuned": lambda x=x, c=tuned, r=t_route, tw=tw: grouped_gemm(x, w, c, mode=MODE_DOWN, route=r,
                                                                              topk_weights=tw, zero_init=True),
            "triton_swap_asm": lambda x=x, r=route, tw=tw: grouped_gemm(x, w, SWAP_CFG, mode=MODE_DOWN, route=r,
                                                                       topk_weights=tw, zero_init=True),
        }
        outs = {name: fn() for name, fn in runs.items()}
        for name, fn in runs.items():
            us = _bench(fn, graph=True)
            res[name] = {"us": us, "weight_GBps": wbytes / us / 1e3,
                         "max_abs_diff_vs_triton_tuned": float((outs[name].float() - outs["triton_tuned"].float())
                                                               .abs().max())}
        res["speedup_vs_triton_tuned"] = res["triton_tuned"]["us"] / res["gluon_w4"]["us"]
        print(f"{shape} T={t}: gluon {res['gluon_w4']['us']:.1f} us, triton tuned {res['triton_tuned']['us']:.1f}"
              f" us, triton SWAP+ASM {res['triton_swap_asm']['us']:.1f} us", file=sys.stderr)
        rows.append(res)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write results here (atomic)")
    ap.add_argument("--tokens", default="1,4,16,64", help="comma-separated decode token counts")
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("bench_gluon_w4: needs an sm90 (Hopper) GPU", file=sys.stderr)
        return 2
    tokens = [int(v) for v in args.tokens.split(",") if v]
    rows = bench_shape(args.shape, tokens)
    write_json_atomic(args.json, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "python": platform.python_version(), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
