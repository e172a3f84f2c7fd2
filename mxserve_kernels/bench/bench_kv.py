"""Benchmark (not a test): packed-KV paged decode attention vs vLLM's own bf16 paged decode, plus KV capacity.

``python -m mxserve_kernels.bench.bench_kv --json out.json [--quick]``

Per (geometry, context, config) row, all measured in the same process:
* our kernel, per packed-split path (``--paths``, default "unpack,raw_asm": the session-4 dequantize-then-dot
  kernel and the dot on raw codes with the PTX unpack; see ``decode.PATHS``), over a sweep of (num_splits,
  block_n, num_warps) -> best and default (``num_splits=None``, default tiling) times under ``paths[name]``; every
  swept output is checked against the first path's default output (``max_abs_diff_vs_default``); the row's
  top-level ``decode_ms`` / ``speedup_vs_peer`` are the best path's (``best_path``);
* the peer (``--peer MODULE:FUNC``, default ``mxserve.vllm_plugin.bench_peers:kv_decode_peer``: only the plugin
  imports vLLM): vLLM's ``flash_attn_varlen_func`` (FA3 on Hopper) over a paged bf16 cache with separate K and V
  (``peer = vllm_fa<N>``); if it cannot be imported / run, torch SDPA over separate contiguous
  [B, H, ctx, D] K and V (``peer = torch_sdpa``);
* device copy bandwidth (``copy_GBps``: 2 x bytes of a 1 GiB ``copy_`` / time).
GB/s = bytes the kernel must read (packed slots; bf16 K+V for the peer) / time; ``pct_of_copy`` = GB/s / copy
GB/s; ``speedup_vs_peer`` = peer ms / our best ms (> 1: our decode attention step is faster than bf16's).
Timing: ``triton.testing.do_bench`` median (it flushes L2 between runs). JSON rewritten atomically after each row.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import torch

from mxserve_kernels.attention import decode, kv_store
from mxserve_kernels.attention.kv_format import KVSlotFormat

GEOMS = {"qwen3-30b-a3b": (4, 32, 128), "llama3-8b": (8, 32, 128)}  # H_kv, H_q, D
CONFIGS = {"K2V1.5": (2, 1.5, 64, 128), "K4V2": (4, 2, 128, 128), "K4V4": (4, 4, 128, 128)}
SWEEP = {"num_splits": (None, 4, 8, 16), "block_n": (32, 64, 128), "num_warps": (2, 4, 8)}
QUICK = {"num_splits": (None, 8, 16), "block_n": (32, 64), "num_warps": (4,)}
PATHS = ("unpack", "raw_asm")


def _ms(fn, rep: int = 25) -> float:
    import triton
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (read + write bytes / s) of a 1 GiB buffer, in GB/s."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = _ms(lambda: b.copy_(a))
    return 2 * n / ms / 1e6


def _peer(q: torch.Tensor, table: torch.Tensor, h: int, ctx: int, page: int, scale: float, provider: str | None):
    """(name, fn, why-not) of the bf16 paged decode peer: the ``--peer MODULE:FUNC`` provider (default vLLM's
    flash-attn, in ``mxserve.vllm_plugin.bench_peers``: this package never imports vLLM) if it runs here, else torch
    SDPA over separate contiguous K and V."""
    b, hq, d = q.shape
    err = "no peer provider"
    if provider:
        try:
            mod, func = provider.split(":")
            name, fn = getattr(importlib.import_module(mod), func)(q, table, h, ctx, page, scale)
            return name, fn, None
        except Exception as e:  # noqa: BLE001 - any import/runtime failure selects the fallback peer
            err = f"{type(e).__name__}: {e}"[:300]
    kf = torch.randn(b, h, ctx, d, device=q.device, dtype=torch.bfloat16)
    vf = torch.randn_like(kf)
    qb = q.unsqueeze(2)
    return "torch_sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(
        qb, kf, vf, scale=scale, enable_gqa=True), err


def bench_one(geom: str, ctx: int, label: str, batch: int, copy: float, sweep: dict, page: int = 16,
              peer: str | None = None, paths: tuple = PATHS) -> dict:
    h, hq, d = GEOMS[geom]
    kb, vb, kg, vg = CONFIGS[label]
    fmt = KVSlotFormat(d, k_bits=kb, v_bits=vb, k_group=kg, v_group=vg)
    dev = "cuda"
    npg = (ctx + page - 1) // page
    gen = torch.Generator(device=dev).manual_seed(0)
    table = torch.randperm(batch * npg, device=dev, generator=gen).to(torch.int32).reshape(batch, npg)
    cache = torch.empty(batch * npg, page, h, fmt.slot_bytes, dtype=torch.uint8, device=dev)
    for i in range(0, batch * npg * page, 1 << 20):  # fill in chunks (bounded temporary memory)
        n = min(1 << 20, batch * npg * page - i)
        k = torch.randn(n, h, d, device=dev, dtype=torch.bfloat16)
        kv_store.store_kv(cache, k, torch.randn_like(k), torch.arange(i, i + n, device=dev), fmt)
    q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)
    fk = torch.randn(batch, 1, h, d, device=dev, dtype=torch.bfloat16)
    lo = torch.zeros(batch, dtype=torch.int32, device=dev)
    hi = torch.full((batch,), ctx - 1, dtype=torch.int32, device=dev)
    nf = torch.ones(batch, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    scale = d ** -0.5

    def ours(**kw):
        return lambda: decode.paged_decode_attention(q, cache, table, lo, hi, fk, fk, nf, fmt, scale, out=out, **kw)

    peer_name, peer_fn, peer_err = _peer(q, table, h, ctx, page, scale, peer)
    ms_peer = _ms(peer_fn)
    nbytes = batch * (ctx - 1) * h * fmt.slot_bytes
    peer_bytes = batch * ctx * h * d * 2 * 2
    ref, res = None, {}
    for path in paths:
        if path != "unpack" and not decode.raw_supported(fmt):
            res[path] = {"skipped": f"{label} not supported by {path}"}
            continue
        ours(path=path)()
        if ref is None:
            ref = out.float().clone()
        trials, diff = [], float((out.float() - ref).abs().max())
        for ns in sweep["num_splits"]:
            for bn in sweep["block_n"]:
                for nw in sweep["num_warps"]:
                    fn = ours(num_splits=ns, block_n=bn, num_warps=nw, path=path)
                    fn()
                    diff = max(diff, float((out.float() - ref).abs().max()))
                    trials.append({"num_splits": ns, "block_n": bn, "num_warps": nw, "ms": round(_ms(fn), 4)})
        best = min(trials, key=lambda t: t["ms"])
        gbps = nbytes / best["ms"] / 1e6
        res[path] = {"decode_ms": best["ms"], "best": {k: best[k] for k in ("num_splits", "block_n", "num_warps")},
                     "default_ms": round(_ms(ours(path=path)), 4), "GBps": round(gbps, 1),
                     "pct_of_copy": round(100 * gbps / copy, 1), "speedup_vs_peer": round(ms_peer / best["ms"], 3),
                     "max_abs_diff_vs_default": diff, "sweep": trials}
    ran = {k: v for k, v in res.items() if "decode_ms" in v}
    top = min(ran, key=lambda k: ran[k]["decode_ms"])
    row = {"geom": geom, "ctx": ctx, "batch": batch, "config": label, "slot_bytes": fmt.slot_bytes,
           "bits_per_elem": round(fmt.bits_per_element(), 4), "capacity_vs_bf16": round(fmt.compression_vs(2), 3),
           "capacity_vs_fp8": round(fmt.compression_vs(1), 3),
           "auto_num_splits": decode.auto_num_splits(batch, h, q.device), "default_path":
           decode.default_path(fmt, q.dtype, True), "best_path": top,
           **{k: ran[top][k] for k in ("decode_ms", "best", "default_ms", "GBps", "pct_of_copy", "speedup_vs_peer")},
           "copy_GBps": round(copy, 1), "peer": peer_name, "peer_ms": round(ms_peer, 4),
           "peer_GBps": round(peer_bytes / ms_peer / 1e6, 1),
           "speedup_by_path": {k: v["speedup_vs_peer"] for k, v in ran.items()},
           "ms_by_path": {k: v["decode_ms"] for k, v in ran.items()}, "paths": res}
    if peer_err:
        row["peer_fallback_reason"] = peer_err
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kv.json"))
    ap.add_argument("--batch", type=int, default=32, help="batch at 8k context (32k uses batch/4)")
    ap.add_argument("--quick", action="store_true", help="small sweep (3 split counts, block 64, 4 warps)")
    ap.add_argument("--peer", default="mxserve.vllm_plugin.bench_peers:kv_decode_peer",
                    help="MODULE:FUNC building the bf16 paged decode peer ('' = torch SDPA)")
    ap.add_argument("--geoms", default=",".join(GEOMS), help="comma list of " + ", ".join(GEOMS))
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ", ".join(decode.PATHS))
    args = ap.parse_args(argv)
    sweep = QUICK if args.quick else SWEEP
    t0 = time.time()
    copy = copy_gbps()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch_8k": args.batch,
            "batch_32k": max(args.batch // 4, 1), "copy_GBps": round(copy, 1),
            "sms": torch.cuda.get_device_properties(0).multi_processor_count, "sweep": sweep,
            "paths": args.paths.split(",")}
    rows = []
    for geom in args.geoms.split(","):
        for ctx in (8192, 32768):
            for label in CONFIGS:
                rows.append(bench_one(geom, ctx, label, args.batch if ctx <= 8192 else max(args.batch // 4, 1),
                                      copy, sweep, peer=args.peer or None, paths=tuple(args.paths.split(","))))
                print({k: v for k, v in rows[-1].items() if k != "paths"}, flush=True)
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
