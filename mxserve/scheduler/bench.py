"""Offload benchmark (not a test): ``python -m mxserve.scheduler.bench --json out.json [--png out.png]``.

In one run on one GPU: (1) pinned host->GPU copy bandwidth of one large buffer and of slot-sized chunks; (2) the
``ExpertCache`` replaying a synthetic Qwen3-30B-A3B router trace (48 layers, E=128, top-8) at several GPU budgets
(fractions of all expert bytes) and batch sizes (decode) plus one long prefill step, with a *proxy* compute per
layer (a dense bf16 GEMM for attention and a gather + reduction reading every routed expert's planes from its
slots); reports step tok/s, stall fraction, achieved H2D GB/s (bytes / copy-busy time) vs the pinned bandwidth,
hit rate and plane mix; (3) the pure simulator for the same settings at the measured bandwidth.

End-to-end tok/s against vLLM ``--cpu-offload-gb`` needs the plugin and a model: see docs/offload.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.layout import LEVELS, PlaneLayout, qwen3_30b_a3b_layout
from mxserve.scheduler.traces import synth_trace

_DT = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16}


def synthetic_expert(layout: PlaneLayout, seed: int) -> dict[str, torch.Tensor]:
    """Random canonical nested tensors of one expert (every tensor of ``layout.specs``), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for lv in LEVELS:
        for sp in layout.specs[lv]:
            if sp.dtype == "uint8":
                out[sp.name] = torch.randint(0, 256, sp.shape, generator=g, dtype=torch.uint8)
            else:
                out[sp.name] = (torch.rand(sp.shape, generator=g) * 0.01).to(_DT[sp.dtype])
    return out


def pinned_bandwidth(nbytes: int, chunk: int | None = None, reps: int = 5) -> float:
    """GB/s of host(pinned)->GPU copies of ``nbytes`` (in ``chunk``-byte copies if given), best of ``reps``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if chunk is None:
            dst.copy_(src, non_blocking=True)
        else:
            for o in range(0, nbytes, chunk):
                dst[o:o + chunk].copy_(src[o:o + chunk], non_blocking=True)
        b.record()
        b.synchronize()
        best = max(best, nbytes / (a.elapsed_time(b) * 1e-3) / 1e9)
    return best


def _proxy_layer(cache, view, x, w_dense) -> torch.Tensor:
    """Dense GEMM + read of every routed expert's planes at its run level (memory-bound decode proxy)."""
    y = x @ w_dense
    rl = view.run_level
    slots = [int(view.base_slot[e]) for e in np.nonzero(rl)[0]]
    slots += [int(view.upper_slot[e]) for e in np.nonzero(rl > LEVELS[0])[0]]
    idx = torch.tensor(slots, dtype=torch.int64).to(x.device, non_blocking=True)
    acc = cache.pool.buf.index_select(0, idx).view(torch.int32).sum(dim=1, dtype=torch.int64)
    return y[:, :1] + acc.sum().to(y.dtype) * 0


def run_case(layout, geo, cfg, tokens: int, steps: int, warmup: int, seed: int, arena=None) -> dict:
    from mxserve.scheduler.expert_cache import ExpertCache
    L, E = geo["layers"], geo["experts"]
    cache = ExpertCache(cfg, layout, L, E, device="cuda", arena=arena)
    cache.engine.timing = True
    cache.preload()
    tr = synth_trace(steps + warmup, L, E, geo["top_k"], tokens, seed=seed)
    x = torch.randn(tokens, geo["hidden"], device="cuda", dtype=torch.bfloat16)
    w_dense = torch.randn(geo["hidden"], 4 * geo["hidden"], device="cuda", dtype=torch.bfloat16)
    ids = torch.from_numpy(tr.topk).cuda()
    pred = torch.from_numpy(tr.pred).cuda()
    t_meas = None
    for s in range(steps + warmup):
        if s == warmup:
            torch.cuda.synchronize()
            cache.snapshot()
            base = dict(cache.snapshot())
            cache.engine.reset_timing()
            t_meas = time.perf_counter()
        for l in range(L):
            view = cache.ensure(l, ids[s, l])
            if l + 1 < L:
                cache.prefetch(l + 1, pred[s, l + 1])
            _proxy_layer(cache, view, x, w_dense)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t_meas
    snap = cache.snapshot()
    moved = snap["bytes_moved"] - base["bytes_moved"]
    busy = cache.engine.busy_seconds()
    stall = snap["stall_seconds"] - base["stall_seconds"]
    mix = {k: snap["plane_mix"][k] - base["plane_mix"][k] for k in snap["plane_mix"]}
    hits, misses = snap["hits"] - base["hits"], snap["misses"] - base["misses"]
    return {"tokens": tokens, "steps": steps, "tok_per_s": tokens * steps / wall, "step_ms": wall / steps * 1e3,
            "stall_fraction": stall / wall, "h2d_gbytes": moved / 1e9, "h2d_gbps": moved / busy / 1e9 if busy else 0.0,
            "hit_rate": hits / max(hits + misses, 1), "plane_mix": mix, "slots": cache.S,
            "budget_gib": cache.S * layout.slot_bytes / 2**30}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "offload_bench.json"))
    ap.add_argument("--png", default=None, help="plot tok/s vs budget here")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--budgets", default="1.0,0.5,0.25")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--policy", default="hebf", choices=["hebf", "lru", "none"])
    ap.add_argument("--on-miss", default="base", choices=["base", "wait"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("mxserve.scheduler.bench needs CUDA")
    layout, geo = qwen3_30b_a3b_layout()
    geo["layers"] = args.layers
    from mxserve.scheduler.transfer import HostArena
    arena = HostArena(layout, geo["layers"], geo["experts"], pin=True)   # shared by every case (pinning is slow)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "geometry": geo,
           "slot_bytes": layout.slot_bytes, "expert_bytes_total": layout.expert_bytes * geo["layers"] * geo["experts"],
           "pinned_gbps": pinned_bandwidth(1 << 30), "pinned_gbps_slot_chunks": pinned_bandwidth(
               256 * layout.slot_bytes, chunk=layout.plane_bytes[3]), "rows": []}
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    cases = [(int(b), args.steps, args.warmup) for b in args.batches.split(",")]
    if args.prefill:
        cases.append((args.prefill, 1, 1))
    for frac in (float(f) for f in args.budgets.split(",")):
        cfg = OffloadConfig(gpu_budget_fraction=frac, policy=args.policy, on_miss=args.on_miss,
                            h2d_gbps=res["pinned_gbps"])
        for tokens, steps, warm in cases:
            row = {"budget_fraction": frac, "policy": args.policy, "on_miss": args.on_miss,
                   **run_case(layout, geo, cfg, tokens, steps, warm, seed=tokens, arena=arena)}
            row["h2d_vs_pinned"] = row["h2d_gbps"] / res["pinned_gbps"]
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    full = {r["tokens"]: r["tok_per_s"] for r in res["rows"] if r["budget_fraction"] == 1.0}
    for r in res["rows"]:
        r["vs_all_resident"] = r["tok_per_s"] / full[r["tokens"]] if r["tokens"] in full else None
    d = os.path.dirname(os.path.abspath(args.json))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, args.json)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for tokens in sorted({r["tokens"] for r in res["rows"]}):
            rows = sorted((r for r in res["rows"] if r["tokens"] == tokens), key=lambda r: r["budget_fraction"])
            ax.plot([r["budget_fraction"] * 100 for r in rows], [r["tok_per_s"] for r in rows], "o-",
                    label=f"T={tokens}")
        ax.set_xlabel("GPU expert budget (% of expert bytes)")
        ax.set_ylabel("tok/s (proxy compute)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"{args.policy}/{args.on_miss} offload, {res['device']}")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
