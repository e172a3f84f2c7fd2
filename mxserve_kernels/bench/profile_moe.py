"""Per-component timing (not a test): routing (torch vs one-launch Triton) and each projection's grouped-GEMM launch
per scheme and config, to see where a fused_moe microsecond goes.

    python -m mxserve_kernels.bench.profile_moe --json OUT.json [--tokens 1,16,64,8192] [--schemes int4_g128_asym]
        [--configs 16,32,16,4,3;4,32,16,4,3,1;...]   (BLOCK_M,BLOCK_N,BLOCK_K,num_warps,num_stages[,FMA];
        default: moe_config's)
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from mxserve_kernels._common.configs import CFG_KEYS, write_json_atomic
from mxserve_kernels.bench.bench_moe import SHAPES, _bench, build_ours
from mxserve_kernels.moe import moe_align, moe_config
from mxserve_kernels.moe.grouped_gemm import MODE_DOWN, MODE_GATE_UP, grouped_gemm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="1,16,64,8192")
    ap.add_argument("--schemes", default="int4_g128_asym,int2_g128_asym,int8_g128_sym,bf16,int1_g128_asym")
    ap.add_argument("--configs", default="", help="';'-separated BLOCK_M,BLOCK_N,BLOCK_K,warps,stages")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_moe: needs a CUDA GPU", file=sys.stderr)
        return 2
    shp = SHAPES[args.model]
    e, h, i, k = shp["E"], shp["H"], shp["I"], shp["K"]
    cfgs = [dict(zip(CFG_KEYS + ("FMA",), map(int, c.split(",")))) for c in args.configs.split(";") if c]
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    weights = {s: build_ours([s], e, h, i) for s in args.schemes.split(",")}
    for t in (int(v) for v in args.tokens.split(",")):
        x = torch.randn(t, h, device="cuda", generator=gen).to(torch.bfloat16)
        tw, ids = torch.topk(torch.softmax(torch.randn(t, e, device="cuda", generator=gen), -1), k, dim=-1)
        tw = tw.float()
        hmid = torch.randn(t * k, i, device="cuda", generator=gen).to(torch.bfloat16)
        for bm in sorted({c["BLOCK_M"] for c in cfgs} | {moe_config(next(iter(weights.values())), t, k)["w13"]
                                                             ["BLOCK_M"]}):
            for path in ("torch", "triton"):
                if path == "triton" and t * k > 1024:
                    continue
                us = _bench(lambda: moe_align(ids, e, bm, use_triton=path == "triton"), graph=True)
                rows.append(dict(what=f"route_{path}", T=t, BLOCK_M=bm, us=us))
                print(json.dumps(rows[-1]), flush=True)
        for name, w in weights.items():
            base = moe_config(w, t, k)
            for cfg13, cfg2 in ([(base["w13"], base["w2"])] + [(c, c) for c in cfgs]):
                route = moe_align(ids, e, cfg13["BLOCK_M"])
                for proj, cfg, fn in (
                        ("w13", cfg13, lambda c=cfg13: grouped_gemm(x, w.w13, c, mode=MODE_GATE_UP, route=route,
                                                                   a_div=k)),
                        ("w2", cfg2, lambda c=cfg2: grouped_gemm(hmid, w.w2, c, mode=MODE_DOWN, route=route,
                                                                topk_weights=tw))):
                    try:
                        us = _bench(fn, graph=True)
                    except Exception as exc:
                        print(f"  {name} {proj} {cfg} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    used = sorted(set(ids.reshape(-1).tolist()))
                    wb = getattr(w, proj).weight_bytes(used)
                    rows.append(dict(what=f"{proj}:{name}", T=t, cfg=cfg, us=us, gbs=wb / us / 1e3))
                    print(json.dumps(rows[-1]), flush=True)
    write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
