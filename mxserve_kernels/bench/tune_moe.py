"""Tuning command (not a test): sweep launch configs of the grouped GEMM per model shape and token count, write
``moe/configs/E=..,H=..,I=..,device_name=...json`` and the per-scheme cost table ``cost_table_<device>.json`` read
by ``moe.cost.expert_gemm_time_us`` (the bit allocator's kernel cost model).

    python -m mxserve_kernels.bench.tune_moe [--models qwen3-30b-a3b,mixtral-8x7b,...] [--quick]
        [--kinds w4,w2,mix25] [--tokens 1,4,16,64]

``--kinds``: representative layers to tune (default w4: the plain entries). Every other kind writes its configs under
the entry's ``by_bits[<dominant width>]`` (``_common/configs``); kinds sharing a width (w2 and mix25: both 2) are
tuned together (the config pair with the lowest summed time over their layers).

Writes are atomic. The serving path only reads these files (never autotunes).
"""
from __future__ import annotations

import argparse
import json
import itertools
import os
import sys

import torch

from mxserve_kernels._common import configs
from mxserve_kernels.bench.bench_moe import OURS, SHAPES, TOKENS, _bench, build_ours
from mxserve_kernels.moe import moe_align
from mxserve_kernels.moe.fused_moe import PREFILL_DEQUANT_ROWS
from mxserve_kernels.moe.grouped_gemm import MODE_DOWN, MODE_GATE_UP, dequant_bf16, grouped_gemm, gscale_step_rows

COST_SCHEMES = ("int1_g128_asym", "int2_g128_asym", "int3_g128_asym", "int4_g128_asym", "int8_g128_sym", "bf16")
COST_M = (1, 4, 16, 64, 256, 1024)
QUICK_TOKENS = (1, 16, 64, 256, 1024, 8192)
# representative layers (schemes cycled over the experts, as bench_moe builds them); w4 = the plain entries
KINDS = {"w4": OURS["ours_w4"], "w2": OURS["ours_w2"], "w3": OURS["ours_w3"], "w8": OURS["ours_w8"],
         "mix25": OURS["ours_mix2.5"]}


def candidates(rows_per_expert: float, quick: bool):
    """Launch configs to try for a regime (BLOCK_K = K extent of one tl.dot: code words per step for integers); at
    decode and mid sizes every per-slot config also with ASM (packed-bf16 PTX dequant of 4/2/3-bit experts), plus
    the SWAP configs (weights as the register A operand of sm90 wgmma)."""
    for cfg in _base_candidates(rows_per_expert, quick):
        yield cfg
        if rows_per_expert <= 64 and not cfg.get("KT"):
            yield {**cfg, "ASM": 1}
    if rows_per_expert <= 64:
        yield from swap_candidates(rows_per_expert, quick)


def swap_candidates(rows_per_expert: float, quick: bool):
    """SWAP configs (``acc^T += W x^T``): BLOCK_N 64 per 4 warps (one wgmma M tile per warp group) or 128 with 8
    warps, BLOCK_M 16 tokens (the wgmma N); at decode also split-K (few tiles in flight). Quick: ASM only."""
    decode = rows_per_expert <= 4
    for bm in ((16,) if decode else (16, 32)):
        for bn, nw in ((64, 4), (128, 8)):
            for bk in ((16, 32) if decode else (16,)):
                for sk in ((1, 2) if quick else (1, 2, 4)) if decode else (1,):
                    for asm in ((1,) if quick else (1, 0)):
                        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=3, SPLIT_K=sk,
                                   ASM=asm, SWAP=1)
                        # GSCALE: int4 scale/zero per group on partial sums, only where a 4-bit step (BLOCK_K*8
                        # rows) lies inside a g128 group (grouped_gemm.gscale_mask; other steps would fall back)
                        if rows_per_expert <= 64 and gscale_step_rows(4, bk) <= 128:
                            yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=3, SPLIT_K=sk,
                                       ASM=asm, SWAP=1, GSCALE=1)


def _base_candidates(rows_per_expert: float, quick: bool):
    if rows_per_expert <= 4:  # decode: bytes in flight per program matter (BLOCK_K words, BLOCK_N)
        space = dict(bm=[16], bn=[16, 32] if quick else [16, 32, 64], bk=[16, 32, 64], nw=[4],
                     ns=[3] if quick else [2, 3, 4])
    elif rows_per_expert <= 64:
        space = dict(bm=[16, 32], bn=[32, 64] if quick else [32, 64, 128], bk=[16] if quick else [16, 32], nw=[4],
                     ns=[3] if quick else [2, 3])
    else:  # prefill: big tiles for tl.dot throughput
        space = dict(bm=[64, 128], bn=[128] if quick else [64, 128], bk=[16, 32], nw=[8],
                     ns=[2] if quick else [2, 3])
    for bm, bn, bk, nw, ns in itertools.product(space["bm"], space["bn"], space["bk"], space["nw"], space["ns"]):
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    if rows_per_expert <= 64:  # KT: one tl.dot per 8*BLOCK_K K rows (weights cross shared memory once per step)
        for bm in ((16,) if rows_per_expert <= 4 else (16, 32, 64)):
            for bn, bk, nw in itertools.product((32, 64), (16, 32), (4, 8)):
                for sk in ((1, 2, 4) if rows_per_expert <= 4 else (1,)):
                    yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=3, SPLIT_K=sk, KT=1)
    if rows_per_expert <= 4:  # FMA K loop (no tensor cores): BLOCK_M 4 or 8 rows, fp32 broadcast-multiply-add
        # BLOCK_M 1/2: one program per routed row (no FMA lanes wasted on padding rows; weights re-read from L2)
        for bm in ((1, 2, 4, 8) if rows_per_expert <= 2 else (2, 4, 8)):
            for bn in ((32, 64) if quick else (16, 32, 64)):
                yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=16, num_warps=4, num_stages=3, FMA=1)
        # split-K: at decode few (expert, n-block) tiles exist (T=1: 8 experts x N/BLOCK_N), each a long serial K
        # loop; splitting K puts 2-8x more programs in flight (partials + one reduce launch)
        for sk in ((2, 4, 8) if quick else (2, 4, 8, 16)):
            for bk in (32, 64):
                yield dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, num_warps=4, num_stages=3, SPLIT_K=sk)
            yield dict(BLOCK_M=1 if rows_per_expert <= 2 else 4, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3,
                       FMA=1, SPLIT_K=sk)


def prefill_inloop_candidates():
    """KT configs for prefill on the packed weights (in-loop dequant; tiles sized for the registers of the dequantized
    8*BLOCK_K x BLOCK_N step plus the gate and up accumulators)."""
    for bm, bn, bk, nw in ((64, 64, 16, 4), (64, 128, 16, 8), (128, 64, 16, 8), (128, 128, 16, 8), (64, 64, 32, 4),
                           (128, 64, 32, 8)):
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=3, KT=1)


def _best_pair(results: dict, what: str) -> dict:
    """Both projections share one route, hence BLOCK_M: the best (us, cfg) per projection at the BLOCK_M whose sum
    is lowest among those both measured."""
    bms = {c["BLOCK_M"] for _, c in results["w13"]} & {c["BLOCK_M"] for _, c in results["w2"]}
    if not bms:
        raise RuntimeError(f"tune_moe: no config ran for {what}")
    pick = {bm: {p: min((r for r in results[p] if r[1]["BLOCK_M"] == bm), key=lambda r: r[0])
                 for p in ("w13", "w2")} for bm in bms}
    return min(pick.values(), key=lambda b: b["w13"][0] + b["w2"][0])


def _measure(cfgs: list[dict], w13, w2, x, hmid, tw, ids, e: int, k: int, rep: int) -> dict:
    """{"w13": [(us, cfg)], "w2": [...]}: each config timed on both projections (CUDA graph); configs that do not
    launch (out of shared memory, registers) are skipped with a note on stderr."""
    results = {"w13": [], "w2": []}
    for cfg in cfgs:
        route = moe_align(ids, e, cfg["BLOCK_M"])
        for proj, fn in (("w13", lambda: grouped_gemm(x, w13, cfg, mode=MODE_GATE_UP, route=route, a_div=k)),
                         ("w2", lambda: grouped_gemm(hmid, w2, cfg, mode=MODE_DOWN, route=route, topk_weights=tw))):
            try:
                results[proj].append((_bench(fn, graph=True, rep=rep), cfg))
            except Exception as exc:  # out of shared memory etc.
                print(f"  skip {cfg}: {type(exc).__name__}", file=sys.stderr)
    return results


def _joint(results: list[dict]) -> dict:
    """Per projection, the summed time of every config measured on all layers (kinds sharing one entry)."""
    if len(results) == 1:
        return results[0]
    out = {}
    for proj in ("w13", "w2"):
        sums: dict[str, list] = {}
        for res in results:
            for us, cfg in res[proj]:
                ent = sums.setdefault(json.dumps(cfg, sort_keys=True), [0.0, 0, cfg])
                ent[0] += us
                ent[1] += 1
        out[proj] = [(us, cfg) for us, n, cfg in sums.values() if n == len(results)]
    return out


def tune_layers(label: str, layers: list, e: int, h: int, k: int, i: int, tokens: list[int], quick: bool,
                device: str = "cuda") -> dict:
    """Best config pair per T for a group of layers sharing one table entry (summed time over the layers).

    Args:
        label: name for the log. layers: MoEWeights [E experts, H, I] (one per kind of the group).
        e, h, k, i: E, H, top-k K, I. tokens: the T to tune. quick: smaller search space, fewer reps.
    Returns:
        {str(T): {"w13": cfg, "w2": cfg}}.
    """
    rep = 30 if quick else 100
    table = {}
    for t in tokens:
        x = torch.randn(t, h, device=device).to(torch.bfloat16)
        tw, ids = torch.topk(torch.rand(t, e, device=device), k, dim=-1)
        tw = tw.float()
        hmid = torch.randn(t * k, i, device=device).to(torch.bfloat16)
        # what fused_moe runs at this T: in-loop dequant, or (prefill) the bf16 weights of the dequant path
        pre = t * k / e >= PREFILL_DEQUANT_ROWS
        cands = list(candidates(t * k / e, quick))
        per = [_measure(cands, dequant_bf16(w.w13) if pre else w.w13, dequant_bf16(w.w2) if pre else w.w2,
                        x, hmid, tw, ids, e, k, rep) for w in layers]
        results = _joint(per)
        best = _best_pair(results, f"{label} T={t}")
        for proj in ("w13", "w2"):  # the generic, ASM and SWAP loops side by side (same run)
            by_loop = {name: min((r[0] for r in results[proj] if pick(r[1])), default=float("nan")) for name, pick in
                    (("generic", lambda c: not c.get("ASM") and not c.get("SWAP")),
                     ("ASM", lambda c: c.get("ASM") and not c.get("SWAP")), ("SWAP", lambda c: c.get("SWAP")))}
            print(f"{label} T={t} {proj}: " + ", ".join(f"best {n} {us:.1f}us" for n, us in by_loop.items()),
                  flush=True)
        if pre:  # prefill: the dequant path (its two dequant launches included) vs in-loop KT on the packed weights
            deq_us = sum(_bench(lambda w=w: (dequant_bf16(w.w13), dequant_bf16(w.w2)), graph=True, rep=rep)
                         for w in layers)
            inloop = _joint([_measure(list(prefill_inloop_candidates()), w.w13, w.w2, x, hmid, tw, ids, e, k, rep)
                             for w in layers])
            alt = _best_pair(inloop, f"{label} T={t} in-loop") if inloop["w13"] and inloop["w2"] else None
            dq_total = deq_us + best["w13"][0] + best["w2"][0]
            print(f"{label} T={t}: dequant path {dq_total:.1f}us (dequant {deq_us:.1f}us)"
                  + (f", in-loop KT {alt['w13'][0] + alt['w2'][0]:.1f}us" if alt else ""), flush=True)
            if alt and alt["w13"][0] + alt["w2"][0] < dq_total:
                best = {p: (alt[p][0], {**alt[p][1], "INLOOP": 1}) for p in ("w13", "w2")}
        table[str(t)] = {"w13": best["w13"][1], "w2": best["w2"][1]}
        print(f"{label} T={t}: w13 {best['w13'][0]:.1f}us {best['w13'][1]}  w2 {best['w2'][0]:.1f}us "
              f"{best['w2'][1]}", flush=True)
    return table


def parse_kinds(spec: str) -> list[str]:
    """``--kinds`` -> kind names (ValueError naming an unknown one)."""
    kinds = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in kinds if s not in KINDS]
    if bad or not kinds:
        raise ValueError(f"tune_moe: --kinds {spec!r}: unknown {bad}; choose from {sorted(KINDS)}")
    return kinds


def tune_shape(model: str, tokens: list[int], quick: bool, kinds: list[str] = ("w4",),
               device: str = "cuda") -> dict:
    """Best config per T for one model shape and each kind; writes the config JSON atomically (merged into the
    existing file: token counts and widths not re-tuned in this run stay).

    w4 fills the plain entries; every other kind the entry's ``by_bits[str(dominant width of its layer)]`` (the
    width ``fused_moe.moe_config`` looks up for such a layer: ``configs.projection_bits``)."""
    shp = SHAPES[model]
    e, h, i, k = shp["E"], shp["H"], shp["I"], shp["K"]
    groups: dict[int | None, list[tuple[str, object]]] = {}
    for kind in kinds:
        w = build_ours(KINDS[kind], e, h, i, device=device)
        b13, b2 = configs.projection_bits(w.w13), configs.projection_bits(w.w2)
        if b13 != b2:  # build_ours gives both projections the same schemes
            raise RuntimeError(f"tune_moe: kind {kind}: gate_up width {b13} != down width {b2}")
        groups.setdefault(None if kind == "w4" else b13, []).append((kind, w))
    new: dict = {}
    for bits, members in groups.items():
        label = f"{model} {'+'.join(n for n, _ in members)}" + ("" if bits is None else f" (by_bits {bits})")
        part = tune_layers(label, [w for _, w in members], e, h, k, i, tokens, quick, device=device)
        for t, pair in part.items():
            ent = new.setdefault(t, {})
            if bits is None:
                ent.update(pair)
            else:
                ent.setdefault("by_bits", {})[str(bits)] = pair
    path = os.path.join(configs.CONFIG_DIR, configs.config_filename({"E": e, "H": h, "I": i},
                                                                    configs.device_name()))
    old = {}
    if os.path.exists(path):  # keep the entries of token counts / widths not re-tuned in this run
        with open(path) as f:
            old = json.load(f)
    table = configs.merge_tables(old, new)
    configs.write_json_atomic(path, table)
    configs._load.cache_clear()
    return table


def cost_table(n: int = 2048, kdim: int = 2048) -> dict:
    """Measured single-expert GEMM time per scheme and M (dense path: one expert, M rows)."""
    from mxserve_kernels._common.synth import random_canonical
    from mxserve_kernels.formats import WeightScheme
    from mxserve_kernels.quant import dequant_linear, prepare_linear
    out = {"device": torch.cuda.get_device_name(), "schemes": {}}
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in COST_SCHEMES:
        s = WeightScheme.parse(name)
        lw = prepare_linear(s, random_canonical(s, n, kdim, device="cuda", generator=g), k=kdim)
        pts = []
        for m in COST_M:
            x = torch.randn(m, kdim, device="cuda").to(torch.bfloat16)
            pts.append([m, n, kdim, _bench(lambda: dequant_linear(x, lw), graph=True, rep=30)])
        out["schemes"][name] = {"points": pts}
        print(f"cost {name}: {[round(p[3], 1) for p in pts]}", flush=True)
    slug = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    configs.write_json_atomic(os.path.join(configs.CONFIG_DIR, f"cost_table_{slug}.json"), out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=None, help=f"default {TOKENS}; --quick: {QUICK_TOKENS}")
    ap.add_argument("--quick", action="store_true", help="smaller search space")
    ap.add_argument("--kinds", default="w4", help=f"layers to tune, of {sorted(KINDS)} (w4: plain entries; others: "
                                                  "by_bits[dominant width])")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost table")
    ap.add_argument("--archive", help="also write a .tar of moe/configs here (e.g. $OUT/configs.tar: the config "
                                      "file names contain '=' and ',', which some file transports refuse)")
    args = ap.parse_args(argv)
    try:
        kinds = parse_kinds(args.kinds)
    except ValueError as exc:
        ap.error(str(exc))
    if not torch.cuda.is_available():
        print("tune_moe: needs a CUDA GPU", file=sys.stderr)
        return 2
    tokens = args.tokens or ",".join(map(str, QUICK_TOKENS if args.quick else TOKENS))
    for model in args.models.split(","):
        tune_shape(model, [int(t) for t in tokens.split(",")], args.quick, kinds)
    if not args.no_cost:
        cost_table()
    if args.archive:
        import tarfile
        tmp = f"{args.archive}.tmp{os.getpid()}"
        with tarfile.open(tmp, "w") as tar:
            for name in sorted(os.listdir(configs.CONFIG_DIR)):
                if name.endswith(".json"):
                    tar.add(os.path.join(configs.CONFIG_DIR, name), arcname=name)
        os.replace(tmp, args.archive)
        print(f"configs archived to {args.archive}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
