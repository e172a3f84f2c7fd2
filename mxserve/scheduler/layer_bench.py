"""Offloaded MoE layers without vLLM, timed per decode step: ``python -m mxserve.scheduler.layer_bench --json
$OUT/offload_layer_bench.json`` (H200, ~2-4 min; ``--layers 48 --batches 1,8,32 --budgets 1.0,0.25``).

What ``OffloadMoEMethod.apply`` does per MoE layer, ``--layers`` times per step, on the Qwen3-30B-A3B expert geometry
(E=128, top-8, H=2048, I=768, int2 nested4 planes; arena contents are uninitialised: timing only): look-ahead
router GEMM + top-k, ``ExpertCache.ensure`` (one host sync), ``OffloadRuntime.slot_weights`` (host einfo, one copy)
and ``fused_moe`` over the slot pool, with near-uniform random routing (vLLM's dummy routers: the worst case for a
cache). The kernels are warmed first exactly as at load (``OffloadRuntime.warm``) and every Triton compile during
the timed steps is counted (``triton.knobs.runtime.jit_post_compile_hook``; 0 expected).

JSON rows per (budget, B): ``step_ms`` (wall, median over steps, synchronised per step), ``tok_per_s``,
``host_ms`` per step split into ``ensure`` (includes waiting at its host sync for the GPU work queued before it),
``einfo`` and ``launch`` (look-ahead + fused_moe launches), ``compiles`` during the timed steps, hit rate, H2D
bytes per step and the bandwidth-bound step time ``h2d_bound_ms`` at the measured pinned bandwidth.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from mxserve.io import write_json_atomic
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import qwen3_30b_a3b_layout


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxserve.scheduler.layer_bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="output JSON path (written atomically after every row)")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes B (tokens per step)")
    p.add_argument("--budgets", default="1.0,0.25", help="gpu_budget_fraction values")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (after 3 untimed)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--pinned-gib", type=float, default=1.0, help="size of the pinned H2D bandwidth probe")
    return p


def _runtime(cfg: OffloadConfig, layout, L: int, E: int, dev: torch.device, arena=None):
    from mxserve.vllm_plugin.offload_method import OffloadRuntime
    rt = OffloadRuntime(cfg, {}, {})
    rt.cache = ExpertCache(cfg, layout, L, E, device=dev, arena=arena, publish_interval_s=None)
    rt.layout = layout
    rt.offsets = (layout.slot_offsets("gate_up"), layout.slot_offsets("down"))
    rt.wbf = torch.zeros(1, dtype=torch.bfloat16, device=dev)
    rt.alloc_einfo(dev)
    rt.cache.preload()
    return rt


def run_row(rt, geo: dict, B: int, steps: int, dev: torch.device, compiles: list) -> dict:
    """Time ``steps`` decode steps of B tokens through every layer of ``rt`` (3 untimed steps first)."""
    from mxserve_kernels.moe import fused_moe
    L, E, K, H = rt.cache.L, rt.cache.E, geo["top_k"], geo["hidden"]
    g = torch.Generator(device="cpu").manual_seed(B)
    ids = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B)])
                       for _ in range((steps + 3) * L)]).view(steps + 3, L, B, K).to(dev, torch.int32)
    x = torch.randn(B, H, generator=g).to(dev, torch.bfloat16)
    router = torch.randn(E, H, generator=g).to(dev, torch.bfloat16)
    tw = torch.full((B, K), 1.0 / K, dtype=torch.float32, device=dev)
    host = {"ensure": 0.0, "einfo": 0.0, "launch": 0.0}
    walls = []
    s0 = rt.cache.stats()
    for s in range(steps + 3):
        if s == 3:
            s0, host, n0 = rt.cache.stats(), dict.fromkeys(host, 0.0), len(compiles)
        t_step = time.perf_counter()
        for l in range(L):
            t0 = time.perf_counter()
            pred = torch.topk(x @ router.t(), K, dim=-1).indices if l + 1 < L else None
            t1 = time.perf_counter()
            view = rt.cache.ensure(l, ids[s, l], next_ids=pred)
            t2 = time.perf_counter()
            w = rt.slot_weights(l, view)
            t3 = time.perf_counter()
            fused_moe(x, w, tw, ids[s, l], activation="silu")
            t4 = time.perf_counter()
            host["launch"] += (t1 - t0) + (t4 - t3)
            host["ensure"] += t2 - t1
            host["einfo"] += t3 - t2
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        walls.append(time.perf_counter() - t_step)
    st = rt.cache.stats()
    hits, misses = st["hits"] - s0["hits"], st["misses"] - s0["misses"]
    step_ms = float(np.median(walls[3:])) * 1e3
    return {"tokens": B, "step_ms": step_ms, "tok_per_s": B / step_ms * 1e3, "layer_ms": step_ms / L,
            "host_ms": {k: v / steps * 1e3 for k, v in host.items()}, "compiles": len(compiles) - n0,
            "hit_rate": hits / max(hits + misses, 1), "h2d_mb_per_step": (st["bytes_moved"] - s0["bytes_moved"])
            / steps / 1e6, "degraded_per_step": (st["degraded"] - s0["degraded"]) / steps}


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    from mxserve.scheduler.bench import pinned_bandwidth
    from mxserve_kernels import warmup
    dev = torch.device(a.device)
    layout, geo = qwen3_30b_a3b_layout()
    E, K = geo["experts"], geo["top_k"]
    batches = [int(b) for b in a.batches.split(",")]
    compiles: list = []
    if dev.type == "cuda":
        from triton import knobs
        knobs.runtime.jit_post_compile_hook = lambda **kw: compiles.append(getattr(kw.get("fn"), "name", "?"))
    gbps = pinned_bandwidth(int(a.pinned_gib * 2**30), device=a.device)
    out = {"layers": a.layers, "pinned_gbps": gbps, "rows": []}
    arena = None
    for frac in (float(f) for f in a.budgets.split(",")):
        rt = _runtime(OffloadConfig(gpu_budget_fraction=frac), layout, a.layers, E, dev, arena)
        arena = rt.cache.arena                                          # pinned once, shared by the budgets
        t0, n0 = time.perf_counter(), len(compiles)
        nwarm = warmup.warm_moe(rt.warm_weights(), K, max(batches)) if dev.type == "cuda" else 0
        warm = {"forwards": nwarm, "compiles": len(compiles) - n0, "s": time.perf_counter() - t0}
        for B in batches:
            row = {"budget_fraction": frac, "slots": rt.cache.S, "warmup": warm,
                   **run_row(rt, geo, B, a.steps, dev, compiles)}
            row["h2d_bound_ms"] = row["h2d_mb_per_step"] / 1e3 / gbps * 1e3
            out["rows"].append(row)
            write_json_atomic(a.json, out)
            print(f"[layer_bench] budget {frac} B={B}: {row['step_ms']:.1f} ms/step ({row['tok_per_s']:.0f} tok/s), "
                  f"host ms/step {({k: round(v, 1) for k, v in row['host_ms'].items()})}, compiles "
                  f"{row['compiles']}, hit {row['hit_rate']:.2f}, h2d bound {row['h2d_bound_ms']:.1f} ms", flush=True)
        del rt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
