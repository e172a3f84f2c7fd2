"""Benchmark (not a test): mixed-precision MoE layer vs vLLM 0.26's MoE kernels on Qwen3-30B-A3B layer shapes.

    python -m mxserve_kernels.bench.bench_moe --json OUT.json --plot OUT.png [--tokens 1,4,16] [--no-vllm]

Cold L2 (``triton.testing.do_bench`` clears a 256 MB buffer before every rep), each method captured in a CUDA graph
when possible (so the numbers are GPU time, not Python launch overhead), copy bandwidth measured in the same run.
Per (method, T): us, TFLOP/s (2*T*K*3*H*I flops), GB/s of weight bytes actually touched (experts with tokens) +
activations, that GB/s as a fraction of copy bandwidth, and the ratio against every vLLM peer present.
The peers come from a provider named by ``--peers MODULE:FUNC`` (default ``mxserve.vllm_plugin.bench_peers:
moe_peers``, which wraps vLLM's kernels): this package never imports vLLM itself, the provider is loaded only when
asked for, and without it only our methods run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch

from mxserve_kernels._common.configs import write_json_atomic
from mxserve_kernels._common.layout import PackedWeights
from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels._common.configs import projection_bits
from mxserve_kernels.moe import MoEWeights, fused_moe, moe_align, moe_config, prepare_experts
from mxserve_kernels.moe.fused_moe import _prefill_weights
from mxserve_kernels.moe.grouped_gemm import MODE_DOWN, MODE_GATE_UP, grouped_gemm

SHAPES = {"qwen3-30b-a3b": dict(E=128, H=2048, I=768, K=8), "mixtral-8x7b": dict(E=8, H=4096, I=14336, K=2),
          "qwen1.5-moe-a2.7b": dict(E=60, H=2048, I=1408, K=4), "olmoe": dict(E=64, H=2048, I=1024, K=8)}
TOKENS = (1, 4, 16, 64, 256, 1024, 8192)
DEFAULT_PEERS = "mxserve.vllm_plugin.bench_peers:moe_peers"
# our methods: name -> scheme per expert (cycled); "mix2.5": 3/4 int2 + 1/4 int4 experts = 2.5 code bits
OURS = {"ours_w4": ["int4_g128_asym"], "ours_w2": ["int2_g128_asym"], "ours_w8": ["int8_g128_sym"],
        "ours_w3": ["int3_g128_asym"], "ours_w1": ["int1_g128_asym"], "ours_bf16": ["bf16"],
        "ours_mix2.5": ["int2_g128_asym", "int2_g128_asym", "int2_g128_asym", "int4_g128_asym"]}


def _bench(fn, graph: bool, rep: int = 100) -> float:
    """Median microseconds over a cold L2; CUDA-graph replay when capturable."""
    import triton.testing
    fn()  # compile / warm up
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                fn()
            fn = g.replay
        except Exception as exc:  # some peers are not capturable: time them eagerly
            print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)", file=sys.stderr)
    return float(triton.testing.do_bench(fn, warmup=min(25, rep), rep=rep, return_mode="median")) * 1e3


def copy_bandwidth_gbs() -> float:
    n = 1 << 29  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = _bench(lambda: dst.copy_(src), graph=False)
    return 2 * n / us / 1e3


def build_ours(schemes: list[str], e: int, h: int, i: int, device: str = "cuda"):
    """One expert's canonical tensors per distinct scheme, replicated to E experts (distinct memory)."""
    g = torch.Generator(device=device).manual_seed(0)
    cache = {}
    gu, dn = [], []
    for j in range(e):
        name = schemes[j % len(schemes)]
        if name not in cache:
            s = WeightScheme.parse(name)
            cache[name] = (s, random_canonical(s, 2 * i, h, device=device, generator=g),
                           random_canonical(s, h, i, device=device, generator=g))
        s, a, b = cache[name]
        gu.append((s, a))
        dn.append((s, b))
    return prepare_experts(gu, dn, hidden=h, inter=i)


def touched_weight_bytes(w, ids: torch.Tensor) -> int:
    used = sorted(set(ids.reshape(-1).tolist()))
    return w.w13.weight_bytes(used) + w.w2.weight_bytes(used)


def separate_launch_fn(w, x, tw, ids):
    """Same work as one mixed launch, but one launch pair per precision group (experts split by kind/bits), each
    with the config serving would pick for that group (``moe_config``: its own dominant width)."""
    info = w.w13.einfo.cpu()
    groups: dict[tuple, list[int]] = {}
    for e in range(w.num_experts):
        groups.setdefault((int(info[e, 0]), int(info[e, 1])), []).append(e)
    t, k = ids.shape
    parts = []
    for experts in groups.values():
        sub = []
        for proj in (w.w13, w.w2):
            einfo = torch.zeros_like(proj.einfo)
            einfo[experts] = proj.einfo[experts]  # other experts become KIND_NONE
            sub.append(PackedWeights(proj.qw, proj.pw, proj.meta, proj.wbf, einfo, proj.n, proj.k))
        cfg = moe_config(MoEWeights(sub[0], sub[1], w.hidden, w.inter), t, k)
        emap = torch.full((w.num_experts,), -1, dtype=torch.int64, device=x.device)
        emap[experts] = torch.tensor(experts, device=x.device)
        route = moe_align(ids, w.num_experts, cfg["w13"]["BLOCK_M"], emap)
        parts.append((sub, route, cfg))

    r = t * k / w.num_experts

    def run():  # same per-launch choices as fused_moe (incl. the prefill dequant path)
        out = None
        for (w13, w2), route, cfg in parts:
            deq = not cfg["w13"].get("INLOOP")
            h = grouped_gemm(x, _prefill_weights(w13, r, x, deq), cfg["w13"], mode=MODE_GATE_UP, route=route,
                             a_div=k)
            y = grouped_gemm(h, _prefill_weights(w2, r, x, deq), cfg["w2"], mode=MODE_DOWN, route=route,
                             topk_weights=tw, zero_init=True)
            out = y if out is None else out + y
        return out.view(t, k, -1).sum(1)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="write results here (atomic)")
    ap.add_argument("--plot", help="PNG of time vs T per method")
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--methods", default=",".join(OURS), help="our methods to run")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM peers")
    ap.add_argument("--peers", default=DEFAULT_PEERS,
                    help="MODULE:FUNC returning ({name: (make_fn(x, tw, ids) -> callable, bytes/expert)}, version)")
    ap.add_argument("--no-graph", action="store_true", help="time eagerly (includes launch overhead)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moe: needs a CUDA GPU", file=sys.stderr)
        return 2
    shp = SHAPES[args.model]
    e, h, i, k = shp["E"], shp["H"], shp["I"], shp["K"]
    tokens = [int(t) for t in args.tokens.split(",")]
    graph = not args.no_graph
    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bw:.0f} GB/s", flush=True)
    import triton
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), model=args.model, shape=shp, copy_gbs=bw, graph=graph)
    peers = {}
    if not args.no_vllm:
        try:
            mod, func = args.peers.split(":")
            peers, env["vllm"] = getattr(importlib.import_module(mod), func)(e, h, i)
        except Exception as exc:
            print(f"vLLM peers unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
    ours = {m: build_ours(OURS[m], e, h, i) for m in args.methods.split(",")}
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for t in tokens:
        x = torch.randn(t, h, device="cuda", generator=gen).to(torch.bfloat16)
        logits = torch.randn(t, e, device="cuda", generator=gen)
        tw, ids = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        ids = ids.to(torch.int32)
        tw = (tw / tw.sum(-1, keepdim=True)).float()
        flops = 2.0 * t * k * 3 * h * i
        n_used = len(set(ids.reshape(-1).tolist()))
        res, used_cfg = {}, {}
        for name, w in ours.items():  # fused_moe's own config choice: per-precision entry of each projection
            res[name] = (_bench(lambda w=w: fused_moe(x, w, tw, ids), graph), touched_weight_bytes(w, ids))
            used_cfg[name] = dict(bits_w13=projection_bits(w.w13), bits_w2=projection_bits(w.w2),
                                  config=moe_config(w, t, k))
        if "ours_mix2.5" in ours:
            res["ours_mix2.5_separate"] = (_bench(separate_launch_fn(ours["ours_mix2.5"], x, tw, ids), graph),
                                           touched_weight_bytes(ours["ours_mix2.5"], ids))
        for name, (make, bytes_per_expert) in peers.items():
            try:
                res[name] = (_bench(make(x, tw, ids), graph), bytes_per_expert * n_used)
            except Exception as exc:
                print(f"  {name} T={t} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for name, (us, wbytes) in res.items():
            gbs = (wbytes + 2 * t * h * 2) / us / 1e3
            row = dict(method=name, T=t, us=us, tflops=flops / us / 1e6, gbs=gbs, frac_copy_bw=gbs / bw,
                       **used_cfg.get(name, {}))
            for peer in peers:
                if peer in res:
                    row[f"ratio_vs_{peer}"] = us / res[peer][0]
            for base in ("ours_w4", "ours_mix2.5_separate"):
                if base in res:
                    row[f"ratio_vs_{base}"] = us / res[base][0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json_atomic(args.json, dict(env=env, rows=rows))
    if args.plot:
        try:
            _plot(rows, args.plot, f"{args.model} MoE layer, {env['gpu']}")
        except ImportError as exc:  # the JSON is the result; the plot is a convenience
            print(f"bench_moe: no plot ({exc}); results are in {args.json}", file=sys.stderr)
    return 0


def _plot(rows, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for m in sorted({r["method"] for r in rows}):
        pts = sorted((r["T"], r["us"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("time per MoE layer (us, cold L2)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
