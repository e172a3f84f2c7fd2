"""Benchmark (not a test): packed-KV decode attention vs a bf16 paged baseline (torch SDPA over gathered pages),
plus KV capacity per configuration. ``python -m mxserve_kernels.bench.bench_kv --json out.json``.

Reports per (geometry, context, config): decode kernel time (triton.testing.do_bench median), bytes read per
step, GB/s, and capacity multiplier vs bf16 / fp8 at equal memory.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mxserve_kernels.attention import decode, kv_store
from mxserve_kernels.attention.kv_format import KVSlotFormat

GEOMS = {"qwen3-30b-a3b": (4, 32, 128), "llama3-8b": (8, 32, 128)}  # H_kv, H_q, D
CONFIGS = {"K2V1.5": (2, 1.5, 64, 128), "K4V2": (4, 2, 128, 128), "K4V4": (4, 4, 128, 128)}


def bench_one(geom: str, ctx: int, label: str, batch: int, page: int = 16) -> dict:
    import triton
    h, hq, d = GEOMS[geom]
    kb, vb, kg, vg = CONFIGS[label]
    fmt = KVSlotFormat(d, k_bits=kb, v_bits=vb, k_group=kg, v_group=vg)
    dev = "cuda"
    npg = (ctx + page - 1) // page
    table = torch.arange(batch * npg, device=dev, dtype=torch.int32).reshape(batch, npg)
    cache = torch.empty(batch * npg, page, h, fmt.slot_bytes, dtype=torch.uint8, device=dev)
    k = torch.randn(batch * npg * page, h, d, device=dev, dtype=torch.bfloat16)
    kv_store.store_kv(cache, k, k, torch.arange(batch * npg * page, device=dev), fmt)
    q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
    fk = torch.randn(batch, 1, h, d, device=dev, dtype=torch.bfloat16)
    lo = torch.zeros(batch, dtype=torch.int32, device=dev)
    hi = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
    nf = torch.ones(batch, dtype=torch.int32, device=dev)
    fn = lambda: decode.paged_decode_attention(q, cache, table, lo, hi, fk, fk, nf, fmt, d ** -0.5,  # noqa: E731
                                               num_splits=16)
    ms = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    kbf = torch.randn(batch, h, ctx, d, device=dev, dtype=torch.bfloat16)
    qb = q.unsqueeze(2)
    base = lambda: torch.nn.functional.scaled_dot_product_attention(qb, kbf, kbf, enable_gqa=True)  # noqa: E731
    ms_bf16 = triton.testing.do_bench(base, warmup=10, rep=50, return_mode="median")
    nbytes = batch * ctx * h * fmt.slot_bytes
    return {"geom": geom, "ctx": ctx, "batch": batch, "config": label, "slot_bytes": fmt.slot_bytes,
            "bits_per_elem": round(fmt.bits_per_element(), 4), "capacity_vs_bf16": round(fmt.compression_vs(2), 3),
            "capacity_vs_fp8": round(fmt.compression_vs(1), 3), "decode_ms": round(ms, 4),
            "bf16_sdpa_ms": round(ms_bf16, 4), "GBps": round(nbytes / ms / 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kv.json"))
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    rows = []
    t0 = time.time()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch_8k": args.batch,
            "batch_32k": max(args.batch // 4, 1)}
    for geom in GEOMS:
        for ctx in (8192, 32768):
            for label in CONFIGS:
                rows.append(bench_one(geom, ctx, label, args.batch if ctx <= 8192 else max(args.batch // 4, 1)))
                print(rows[-1], flush=True)
                _write(args.json, {"meta": {**meta, "seconds": round(time.time() - t0, 1)}, "rows": rows})
    return 0


def _write(path: str, obj: dict) -> None:
    """Atomic JSON write (rewritten after every row, so a killed run keeps what it measured)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    raise SystemExit(main())
