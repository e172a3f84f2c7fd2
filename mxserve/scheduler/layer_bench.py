"""Offloaded MoE layers without vLLM, timed per decode step: ``python -m mxserve.scheduler.layer_bench --json
$OUT/offload_layer_bench.json`` (H200; defaults ``--layers 48 --batches 1,8,32 --budgets 1.0,0.25``, routings
uniform and synth, + one 2048-token prefill row per budget and routing; meant to fit ~240 s, not yet timed on the
GPU: ``--max-seconds`` 220 stops starting rows, which are then listed under ``skipped``).

What ``OffloadMoEMethod.apply`` does per MoE layer, ``--layers`` times per step, on the Qwen3-30B-A3B expert geometry
(E=128, top-8, H=2048, I=768, int2 nested4 planes; arena contents are uninitialised: timing only): look-ahead
router GEMM + top-k, ``ExpertCache.ensure`` (one host sync), ``OffloadRuntime.slot_weights`` (host einfo, one copy)
and ``fused_moe`` over the slot pool. The kernels are warmed first exactly as at load (``OffloadRuntime.warm``) and
every Triton compile during the timed steps is counted (``triton.knobs.runtime.jit_post_compile_hook``; 0 expected).

Routings (``--routing``, repeatable; default both, each its own rows):
* ``uniform``: every token draws K distinct experts uniformly (like vLLM's dummy routers: the worst case for a
  cache); the look-ahead prediction is the top-k of a random router GEMM (``x @ W^T``), i.e. ~K/E accurate.
* ``synth[:zipf_a=..,drift=..,locality=..,pred_acc=..,seed=..]``: ``traces.synth_trace`` (Zipf popularity with
  drift, per-token temporal locality); the ``next_ids`` passed to ``ensure`` are the trace's predicted ids, so the
  prediction accuracy is the trace's ``pred_acc``. The router GEMM still runs (result unused) so that both routings
  pay the same look-ahead compute; it is timed inside ``host_ms.launch`` for both.

JSON rows per (budget, routing, phase, B): ``routing`` (name + every generator parameter), ``phase`` (decode /
prefill), ``step_ms`` (wall, median over steps, synchronised per step), ``tok_per_s``, ``vs_all_resident``
(tok/s over the budget-1.0 row of the same routing, phase and B; null without one), ``distinct_experts`` (mean
distinct experts per layer-step), ``hit_rate``, ``h2d_mb_per_step``, ``h2d_bound_ms`` (H2D bytes at the measured
pinned bandwidth), ``h2d_gbps`` / ``h2d_vs_pinned`` (H2D bytes over the step wall time), ``host_ms`` per step split
into ``ensure`` (includes waiting at its host sync for the GPU work queued before it), ``einfo`` and ``launch``,
``compiles`` during the timed steps. Prefill rows: one untimed then one timed step of ``--prefill-tokens`` tokens.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time

import numpy as np
import torch

from mxserve.io import write_json_atomic
from mxserve.scheduler.config import ON_MISS, OffloadConfig
from mxserve.scheduler.expert_cache import ExpertCache
from mxserve.scheduler.layout import PlaneLayout, qwen3_30b_a3b_layout
from mxserve.scheduler.traces import synth_trace

SYNTH_PARAMS = ("zipf_a", "drift", "locality", "pred_acc", "seed")
DECODE_WARM_STEPS, PREFILL_WARM_STEPS = 3, 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxserve.scheduler.layer_bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="output JSON path (written atomically after every row)")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes B (tokens per step)")
    p.add_argument("--budgets", default="1.0,0.25", help="gpu_budget_fraction values")
    p.add_argument("--routing", action="append", default=None,
                   help="uniform | synth[:zipf_a=..,drift=..,locality=..,pred_acc=..,seed=..]; repeat for several "
                        "(default: uniform and synth with synth_trace's defaults)")
    p.add_argument("--steps", type=int, default=20, help=f"timed decode steps per row (after {DECODE_WARM_STEPS} "
                                                         "untimed)")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="tokens of the prefill row (0: no prefill rows)")
    p.add_argument("--on-miss", default="base", choices=ON_MISS, help="OffloadConfig.on_miss")
    p.add_argument("--geometry", default="a3b", choices=("a3b", "tiny"),
                   help="a3b: Qwen3-30B-A3B experts; tiny: E=64, top-4, H=256, I=128 (CPU tests)")
    p.add_argument("--max-seconds", type=float, default=220.0,
                   help="start no new row after this many seconds (rows left are listed under 'skipped')")
    p.add_argument("--device", default="cuda")
    p.add_argument("--pinned-gib", type=float, default=1.0, help="size of the pinned H2D bandwidth probe")
    return p


def parse_routing(spec: str) -> dict:
    """``uniform`` | ``synth[:k=v,...]`` -> ``{"name": ..., **params}`` (synth: every ``synth_trace`` default
    filled in). Raises ValueError naming the spec for an unknown routing, key or value."""
    name, _, rest = spec.strip().partition(":")
    if name == "uniform" and not rest:
        return {"name": "uniform"}
    if name != "synth":
        raise ValueError(f"--routing {spec!r}: expected 'uniform' or 'synth[:zipf_a=..,locality=..,pred_acc=..]'")
    sig = inspect.signature(synth_trace).parameters
    out = {"name": "synth", **{k: sig[k].default for k in SYNTH_PARAMS}}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or k.strip() not in SYNTH_PARAMS:
            raise ValueError(f"--routing {spec!r}: {item!r} is not key=value with a key in {SYNTH_PARAMS}")
        k = k.strip()
        try:
            out[k] = type(sig[k].default)(v)
        except ValueError:
            raise ValueError(f"--routing {spec!r}: {k}={v!r} is not a {type(sig[k].default).__name__}") from None
    for k in ("drift", "locality", "pred_acc"):
        if not 0.0 <= out[k] <= 1.0:
            raise ValueError(f"--routing {spec!r}: {k}={out[k]} outside [0, 1]")
    if out["zipf_a"] < 0:
        raise ValueError(f"--routing {spec!r}: zipf_a={out['zipf_a']} must be >= 0")
    return out


def routing_label(r: dict) -> str:
    return r["name"] if r["name"] == "uniform" else "synth(" + ",".join(f"{k}={r[k]}" for k in SYNTH_PARAMS) + ")"


def routing_ids(r: dict, steps: int, L: int, E: int, K: int, T: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Router decisions of ``steps`` steps: topk [S, L, T, K] int64 and, for synth, the trace's look-ahead
    prediction pred [S, L, T, K] (pred[s, l] is what ``ensure(l - 1)`` receives as ``next_ids``); uniform: None.
    Deterministic: uniform is seeded with T, synth with its ``seed``."""
    if r["name"] == "uniform":
        g = torch.Generator(device="cpu").manual_seed(T)
        ids = torch.rand(steps * L * T, E, generator=g).topk(K, dim=-1).indices   # K distinct, uniform subset
        return ids.view(steps, L, T, K).numpy().astype(np.int64), None
    tr = synth_trace(steps, L, E, K, T, **{k: r[k] for k in SYNTH_PARAMS})
    return tr.topk, tr.pred


def distinct_experts(ids: np.ndarray, E: int) -> np.ndarray:
    """[S * L] number of distinct experts routed per (step, layer); ids [S, L, T, K]."""
    S, L, T, K = ids.shape
    hit = np.zeros((S * L, E), bool)
    hit[np.repeat(np.arange(S * L), T * K), ids.reshape(-1)] = True
    return hit.sum(axis=1)


def geometry(name: str) -> tuple[PlaneLayout, dict]:
    """(layout, geo) of ``a3b`` (Qwen3-30B-A3B) or ``tiny`` (E=64, top-4, H=256, I=128, int2 nested4 g128)."""
    layout, geo = qwen3_30b_a3b_layout()
    if name == "a3b":
        return layout, geo
    geo = {"layers": 2, "experts": 64, "top_k": 4, "hidden": 256, "inter": 128}
    return PlaneLayout(hidden=geo["hidden"], inter=geo["inter"], gate_up=layout.gate_up, down=layout.down), geo


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


def run_row(rt, geo: dict, topk: np.ndarray, pred: np.ndarray | None, warm_steps: int, dev: torch.device,
            compiles: list) -> dict:
    """Time the steps of ``topk`` [S, L, T, K] through every layer of ``rt``; the first ``warm_steps`` untimed.
    ``pred`` [S, L, T, K] (synth) is the look-ahead passed as ``next_ids``; None: the router GEMM's top-k."""
    from mxserve_kernels.moe import fused_moe
    S, L, T, K = topk.shape
    E, H = rt.cache.E, geo["hidden"]
    steps = S - warm_steps
    g = torch.Generator(device="cpu").manual_seed(T)
    ids = torch.from_numpy(topk).to(dev, torch.int32)
    nxt = None if pred is None else torch.from_numpy(pred).to(dev, torch.int32)
    x = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
    router = torch.randn(E, H, generator=g).to(dev, torch.bfloat16)
    tw = torch.full((T, K), 1.0 / K, dtype=torch.float32, device=dev)
    host = {"ensure": 0.0, "einfo": 0.0, "launch": 0.0}
    walls, s0, n0 = [], rt.cache.stats(), len(compiles)
    for s in range(S):
        if s == warm_steps:
            s0, host, n0 = rt.cache.stats(), dict.fromkeys(host, 0.0), len(compiles)
        t_step = time.perf_counter()
        for l in range(L):
            t0 = time.perf_counter()
            look = torch.topk(x @ router.t(), K, dim=-1).indices if l + 1 < L else None
            if nxt is not None and look is not None:
                look = nxt[s, l + 1]
            t1 = time.perf_counter()
            view = rt.cache.ensure(l, ids[s, l], next_ids=look)
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
    step_ms = float(np.median(walls[warm_steps:])) * 1e3
    h2d = (st["bytes_moved"] - s0["bytes_moved"]) / steps
    return {"tokens": T, "steps": steps, "step_ms": step_ms, "tok_per_s": T / step_ms * 1e3, "layer_ms": step_ms / L,
            "distinct_experts": float(distinct_experts(topk[warm_steps:], E).mean()),
            "host_ms": {k: v / steps * 1e3 for k, v in host.items()}, "compiles": len(compiles) - n0,
            "hit_rate": hits / max(hits + misses, 1), "h2d_mb_per_step": h2d / 1e6,
            "h2d_gbps": h2d / (step_ms * 1e-3) / 1e9, "degraded_per_step": (st["degraded"] - s0["degraded"]) / steps}


def fill_ratios(rows: list[dict]) -> None:
    """Set ``vs_all_resident`` of every row: tok/s over the budget-1.0 row of the same routing, phase and B."""
    ref = {(routing_label(r["routing"]), r["phase"], r["tokens"]): r["tok_per_s"] for r in rows
           if r["budget_fraction"] == 1.0}
    for r in rows:
        t = ref.get((routing_label(r["routing"]), r["phase"], r["tokens"]))
        r["vs_all_resident"] = None if t is None else r["tok_per_s"] / t


def summary_line(r: dict) -> str:
    ratio = "n/a" if r.get("vs_all_resident") is None else f"{r['vs_all_resident']:.2f}x"
    return (f"{r['phase']:7s} {routing_label(r['routing'])} budget {r['budget_fraction']} B={r['tokens']}: "
            f"{r['step_ms']:.1f} ms/step, {r['tok_per_s']:.0f} tok/s ({ratio} of budget 1.0), distinct "
            f"{r['distinct_experts']:.1f}, hit {r['hit_rate']:.2f}, h2d {r['h2d_mb_per_step']:.4g} MB/step = "
            f"{r['h2d_bound_ms']:.3g} ms bound ({r['h2d_vs_pinned']:.2f} of pinned), host ms "
            f"{ {k: round(v, 1) for k, v in r['host_ms'].items()} }, compiles {r['compiles']}")


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    routings = [parse_routing(s) for s in (a.routing or ["uniform", "synth"])]
    from mxserve.scheduler.bench import pinned_bandwidth
    from mxserve_kernels import warmup
    t_start = time.perf_counter()
    dev = torch.device(a.device)
    layout, geo = geometry(a.geometry)
    E, K, L = geo["experts"], geo["top_k"], a.layers
    batches = [int(b) for b in a.batches.split(",")]
    compiles: list = []
    if dev.type == "cuda":
        from triton import knobs
        knobs.runtime.jit_post_compile_hook = lambda **kw: compiles.append(getattr(kw.get("fn"), "name", "?"))
    gbps = pinned_bandwidth(int(a.pinned_gib * 2**30), device=a.device)
    out = {"layers": L, "geometry": geo, "on_miss": a.on_miss, "pinned_gbps": gbps, "rows": [], "skipped": [],
           "failed": [], "build": []}
    traces: dict = {}          # (routing index, phase, T) -> (topk, pred): the same decisions for every budget
    cases = [(ri, "decode", B) for ri in range(len(routings)) for B in batches]
    cases += [(ri, "prefill", a.prefill_tokens) for ri in range(len(routings)) if a.prefill_tokens > 0]
    arena = None
    for frac in (float(f) for f in a.budgets.split(",")):
        if time.perf_counter() - t_start > a.max_seconds:
            out["skipped"] += [{"budget_fraction": frac, "routing": routings[ri], "phase": ph, "tokens": T,
                                "reason": "--max-seconds"}
                               for ri, ph, T in cases]
            continue
        t0 = time.perf_counter()
        rt = _runtime(OffloadConfig(gpu_budget_fraction=frac, on_miss=a.on_miss), layout, L, E, dev, arena)
        arena = rt.cache.arena                                          # pinned once, shared by the budgets
        t1, n0 = time.perf_counter(), len(compiles)
        nwarm = warmup.warm_moe(rt.warm_weights(), K, max(batches)) if dev.type == "cuda" else 0
        warm = {"forwards": nwarm, "compiles": len(compiles) - n0, "s": time.perf_counter() - t1}
        out["build"].append({"budget_fraction": frac, "slots": rt.cache.S, "runtime_s": t1 - t0, "warmup": warm})
        write_json_atomic(a.json, out)   # session 6: a run cut during build/warm-up returned nothing
        print(f"[layer_bench] budget {frac}: runtime built in {t1 - t0:.1f} s ({rt.cache.S} slots), warm-up "
              f"{warm['s']:.1f} s ({nwarm} forwards, {warm['compiles']} compiles)", flush=True)
        for ri, phase, T in cases:
            r = routings[ri]
            if time.perf_counter() - t_start > a.max_seconds:
                out["skipped"].append({"budget_fraction": frac, "routing": r, "phase": phase, "tokens": T,
                                       "reason": "--max-seconds"})
                continue
            warm_steps = DECODE_WARM_STEPS if phase == "decode" else PREFILL_WARM_STEPS
            if (ri, phase, T) not in traces:
                traces[ri, phase, T] = routing_ids(r, warm_steps + (a.steps if phase == "decode" else 1), L, E, K, T)
            need = int(distinct_experts(traces[ri, phase, T][0], E).max())
            if need > rt.cache.S:    # the policy raises: every routed expert's base plane must be resident
                out["skipped"].append({"budget_fraction": frac, "routing": r, "phase": phase, "tokens": T,
                                       "reason": f"{need} routed experts in one layer > {rt.cache.S} slots"})
                print(f"[layer_bench] skip {phase} {routing_label(r)} budget {frac} B={T}: {need} routed experts "
                      f"in one layer > {rt.cache.S} slots", flush=True)
                continue
            try:
                timed = run_row(rt, geo, *traces[ri, phase, T], warm_steps, dev, compiles)
            except Exception as e:      # e.g. a kernel that fails to compile: keep the rows that ran, go on
                out["failed"].append({"budget_fraction": frac, "routing": r, "phase": phase, "tokens": T,
                                      "error": f"{type(e).__name__}: {e}"[:2000]})
                write_json_atomic(a.json, out)
                print(f"[layer_bench] FAILED {phase} {routing_label(r)} budget {frac} B={T}: {type(e).__name__}: "
                      f"{str(e)[:300]}", flush=True)
                continue
            row = {"budget_fraction": frac, "slots": rt.cache.S, "routing": r, "phase": phase, **timed}
            row["h2d_bound_ms"] = row["h2d_mb_per_step"] / 1e3 / gbps * 1e3
            row["h2d_vs_pinned"] = row["h2d_gbps"] / gbps
            out["rows"].append(row)
            fill_ratios(out["rows"])
            write_json_atomic(a.json, out)
            print(f"[layer_bench] {summary_line(row)}", flush=True)
        del rt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["total_s"] = time.perf_counter() - t_start
    write_json_atomic(a.json, out)
    print(f"[layer_bench] summary ({out['total_s']:.0f} s, pinned {gbps:.1f} GB/s, {len(out['skipped'])} rows "
          f"skipped, {len(out['failed'])} failed):", flush=True)
    for row in out["rows"]:
        print(f"[layer_bench]   {summary_line(row)}", flush=True)
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
