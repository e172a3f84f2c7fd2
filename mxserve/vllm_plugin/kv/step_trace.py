"""Step trace of the packed-KV backend on the ``vllm bench throughput`` workload: per engine step, the metadata vLLM
0.26 gives one attention layer (chunked prefill under a token budget, decodes first), run through OUR builder
(``MxKVMetadataBuilder.build``), ``do_kv_cache_update`` and ``forward``, counting the host work of each step.

Counted per step (a ``TorchFunctionMode`` over build + store + forward): torch calls, host reads (``item`` /
``tolist`` / ``cpu`` / ``__bool__`` / ``__int__`` / ``__float__`` / ``nonzero``, keyed by "op at file:line": a
read of a ``*_cpu`` metadata tensor is free, one of a device tensor is a sync), Triton launches and the largest
single tensor an op returns (O(context) temporaries show up there). ``stub_kernels=True`` replaces the Triton
kernels by launch recorders and forces the launchers onto their GPU code path, so the CPU sees exactly the host work
the H200 does (the CUDA code path minus the kernels); ``False`` runs the real kernels (GPU) and the step times are
the layer's real attention time.

``python -m mxserve.vllm_plugin.kv.step_trace --device cuda --json OUT`` (defaults = the bench: 64 requests,
8192 + 9 prompt tokens, 256 out, 16384-token steps, Qwen3-30B-A3B heads 32 / 4 x 128, K2V1.5, page 16).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

from mxserve_kernels.attention import decode, kv_store

SYNC_OPS = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__", "nonzero", "numpy")


@dataclass(frozen=True)
class Chunk:
    """One request's share of a step: ``computed`` tokens already cached, ``new`` tokens this step."""
    req: int
    computed: int
    new: int


def schedule(num_reqs: int, prompt_len: int, out_len: int, budget: int) -> list[list[Chunk]]:
    """vLLM 0.26's chunked-prefill order for equal requests: running ones first (a decode = 1 token, an unfinished
    prefill continues), then waiting ones while the token budget lasts; decodes first within the step (the
    runner's reorder for ``reorder_batch_threshold`` 1).

    Args:
        num_reqs: N requests; prompt_len: P tokens each; out_len: O generated tokens each; budget: tokens per step.
    Returns:
        steps, each a list of Chunk (decodes first).
    """
    if min(num_reqs, prompt_len, out_len, budget) <= 0:
        raise ValueError(f"schedule: all sizes must be > 0, got {num_reqs=} {prompt_len=} {out_len=} {budget=}")
    done = [0] * num_reqs  # tokens in the cache
    running: list[int] = []
    waiting = list(range(num_reqs))
    total = prompt_len + out_len - 1  # the last generated token is never fed back
    steps: list[list[Chunk]] = []
    while running or waiting:
        left, step = budget, []
        for r in running:
            if left == 0:
                break
            n = min(prompt_len - done[r], left) if done[r] < prompt_len else 1
            step.append(Chunk(r, done[r], n))
            left -= n
        while waiting and left > 0:
            r = waiting.pop(0)
            running.append(r)
            n = min(prompt_len, left)
            step.append(Chunk(r, 0, n))
            left -= n
        for c in step:
            done[c.req] += c.new
        running = [r for r in running if done[r] < total]
        steps.append(sorted(step, key=lambda c: c.new > 1))  # stable: decodes first, then prefills in order
    return steps


def _caller() -> str:
    """``pkg/file.py:line`` of the innermost frame outside torch and this module (where a sync was asked for)."""
    f = sys._getframe(2)
    while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return "?"
    parts = f.f_code.co_filename.replace(os.sep, "/").split("/")
    return f"{'/'.join(parts[-2:])}:{f.f_lineno}"


class _Counter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.syncs: dict[str, int] = {}
        self.max_bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        self.calls += 1
        if name in SYNC_OPS:
            site = f"{name} at {_caller()}"
            self.syncs[site] = self.syncs.get(site, 0) + 1
        res = func(*args, **(kwargs or {}))
        if isinstance(res, torch.Tensor) and name not in ("__getitem__", "view", "reshape", "narrow"):
            self.max_bytes = max(self.max_bytes, res.untyped_storage().nbytes() if res.is_contiguous() else 0)
        return res


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kw)`` only counts the launch."""

    def __init__(self, counts: dict, name: str) -> None:
        self.counts, self.name = counts, name

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return launch


def _metadata(step: list[Chunk], page: int, max_pages: int, device: torch.device):
    """vLLM's CommonAttentionMetadata of one step (block i of request r = page r * max_pages + i)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    q_lens = torch.tensor([c.new for c in step], dtype=torch.int32)
    seq = torch.tensor([c.computed + c.new for c in step], dtype=torch.int32)
    qsl = torch.zeros(len(step) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    table = torch.stack([torch.arange(max_pages, dtype=torch.int32) + c.req * max_pages for c in step])
    pos = torch.cat([torch.arange(c.computed, c.computed + c.new) for c in step])
    rows = torch.repeat_interleave(torch.arange(len(step)), q_lens.long())
    slots = table[rows, pos // page].long() * page + pos % page
    return CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device), num_reqs=len(step),
        num_actual_tokens=int(qsl[-1]), max_query_len=int(q_lens.max()), max_seq_len=int(seq.max()),
        block_table_tensor=table.to(device), slot_mapping=slots.to(device), seq_lens_cpu_upper_bound=seq)


def trace(num_reqs: int = 64, prompt_len: int = 8201, out_len: int = 256, budget: int = 16384, hq: int = 32,
          h: int = 4, d: int = 128, page: int = 16, label: str = "K2V1.5", device: str = "cpu",
          stub_kernels: bool = True, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """Run every step of the workload through one layer of our backend; host work and time per step.

    Args:
        num_reqs, prompt_len, out_len, budget: the bench workload (see ``schedule``).
        hq, h, d: query heads, KV heads, head dim. page: tokens per KV page. label: "K{b}V{b}" KV config.
        device: where tensors live. stub_kernels: Triton kernels replaced by launch recorders (host work only).
    Returns:
        {"config": ..., "steps": [{kind, decodes, prefills, tokens, prefills_with_context, max_context, calls,
         syncs ("op at file:line" -> n), launches, max_tensor_bytes, ms}],
         "totals": {...}}.
    """
    from mxserve.kvcache.config import KVQuantConfig
    from mxserve.vllm_plugin.kv.backend import MxKVImpl, MxKVMetadataBuilder
    m = re.fullmatch(r"K(\d+(?:\.5)?)V(\d+(?:\.5)?)", label)
    if m is None:
        raise ValueError(f"trace: label must look like K2V1.5 / K4V4, got {label!r}")
    kb, vb = (float(x) if "." in x else int(x) for x in m.groups())
    group = lambda b: min(64 if b == 2 else 128, d)  # noqa: E731  (the docs/kv-cache.md table's groups)
    fmt = KVQuantConfig.uniform(1, kb, vb, group(kb), group(vb)).layers[0].slot_format(d)
    dev = torch.device(device)
    max_pages = -(-(prompt_len + out_len) // page)
    cache = torch.zeros(num_reqs * max_pages, page, h, fmt.slot_bytes, dtype=torch.uint8, device=dev)
    impl = MxKVImpl(hq, d, d ** -0.5, h)
    impl.bind(fmt, None, None, 1.0, 1.0)
    builder = SimpleNamespace(reorder_batch_threshold=1)
    launches: dict[str, int] = {}
    saved = (kv_store._interpret, decode._interpret, kv_store.__dict__.get("kv_store_kernel"),
             decode.__dict__.get("paged_decode_kernel"), decode.__dict__.get("merge_kernel"))
    if stub_kernels:
        kv_store._interpret = decode._interpret = lambda: True
        kv_store.kv_store_kernel = _Recorder(launches, "kv_store")
        decode.paged_decode_kernel = _Recorder(launches, "paged_decode")
        decode.merge_kernel = _Recorder(launches, "merge")
    torch.manual_seed(seed)
    rows = []
    try:
        for step in schedule(num_reqs, prompt_len, out_len, budget):
            cam = _metadata(step, page, max_pages, dev)
            t = cam.num_actual_tokens
            q = torch.randn(t, hq * d, device=dev, dtype=dtype)  # on the device: 16k x 4096 per step
            k = torch.randn(t, h * d, device=dev, dtype=dtype)
            v = torch.randn(t, h * d, device=dev, dtype=dtype)
            before = dict(launches)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            with _Counter() as cnt:
                md = MxKVMetadataBuilder.build(builder, 0, cam)
                impl.do_kv_cache_update(None, k, v, cache, cam.slot_mapping)
                impl.forward(None, q, k, v, cache, md)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            nd = md.num_decodes
            rows.append({"kind": "decode" if nd == len(step) else ("prefill" if nd == 0 else "mixed"),
                         "decodes": nd, "prefills": len(step) - nd, "tokens": t,
                         "prefills_with_context": sum(c.new > 1 and c.computed > 0 for c in step),
                         "max_context": max(c.computed for c in step), "calls": cnt.calls, "syncs": cnt.syncs,
                         "launches": {n: launches.get(n, 0) - before.get(n, 0) for n in launches},
                         "max_tensor_bytes": cnt.max_bytes, "ms": round(1e3 * (time.perf_counter() - t0), 3)})
    finally:
        kv_store._interpret, decode._interpret = saved[0], saved[1]
        for mod, name, obj in ((kv_store, "kv_store_kernel", saved[2]), (decode, "paged_decode_kernel", saved[3]),
                               (decode, "merge_kernel", saved[4])):
            if obj is not None:
                setattr(mod, name, obj)
    totals = {kind: {"steps": sum(r["kind"] == kind for r in rows),
                     "ms": round(sum(r["ms"] for r in rows if r["kind"] == kind), 1),
                     "syncs": sum(sum(r["syncs"].values()) for r in rows if r["kind"] == kind)}
              for kind in ("prefill", "mixed", "decode")}
    return {"config": {"num_reqs": num_reqs, "prompt_len": prompt_len, "out_len": out_len, "budget": budget,
                       "hq": hq, "h": h, "d": d, "page": page, "label": label, "device": device,
                       "stub_kernels": stub_kernels, "slot_bytes": fmt.slot_bytes},
            "steps": rows, "totals": totals}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-reqs", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=8201)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--label", default="K2V1.5")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stub-kernels", action="store_true", help="launch recorders instead of the Triton kernels")
    ap.add_argument("--json", required=True, help="output path (written atomically)")
    a = ap.parse_args(argv)
    res = trace(a.num_reqs, a.prompt_len, a.out_len, a.budget, label=a.label, device=a.device,
                stub_kernels=a.stub_kernels)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(a.json + ".tmp", a.json)
    print(json.dumps(res["totals"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
