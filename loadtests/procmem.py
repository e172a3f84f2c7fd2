"""Sample the resident memory of a server's whole process tree (API server + engine core + workers) and, when
``nvidia-smi`` exists, the GPU memory in use, until a stop file appears or a time limit passes.

    python -m loadtests.procmem --pid PID --out rss.jsonl [--interval 5] [--max-seconds 1900] [--stop-file F]

One JSON line per sample: ``{"t": s since start, "rss_bytes": sum over the tree, "n_procs": ..,
"gpu_used_bytes": sum over GPUs or null}``. ``/metrics``' ``process_resident_memory_bytes`` only covers vLLM's API
server process; the engine core and GPU workers are other processes, hence this sampler (Linux ``/proc`` only).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/PID/task/*/children``); [] when the process is gone."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (breadth first)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        if p not in seen:
            seen.append(p)
            todo += children(p)
    return seen


def rss_bytes(pid: int) -> int:
    """VmRSS of one process in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_used_bytes() -> int | None:
    """Sum of ``memory.used`` over all GPUs (nvidia-smi), None without nvidia-smi or on failure."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        txt = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return sum(int(x) for x in txt.split()) * 1024 * 1024
    except (subprocess.SubprocessError, ValueError, OSError):
        return None


def sample(pid: int) -> dict:
    """One sample of the tree rooted at ``pid``: {"rss_bytes", "n_procs", "gpu_used_bytes"}."""
    procs = tree(pid)
    return {"rss_bytes": sum(rss_bytes(p) for p in procs), "n_procs": len(procs), "gpu_used_bytes": gpu_used_bytes()}


def growth(values: list[float]) -> float | None:
    """(mean of the last quarter - mean of the first quarter) / first quarter; None with < 4 samples."""
    if len(values) < 4:
        return None
    q = max(1, len(values) // 4)
    first, last = sum(values[:q]) / q, sum(values[-q:]) / q
    return (last - first) / first if first else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.procmem", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", type=int, required=True, help="root of the process tree (the server)")
    ap.add_argument("--out", required=True, help="JSON lines, appended and flushed per sample")
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=float, default=4 * 3600.0)
    ap.add_argument("--stop-file", default=None, help="stop once this file exists")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    with open(a.out, "a") as f:
        while time.monotonic() - t0 < a.max_seconds and not (a.stop_file and os.path.exists(a.stop_file)):
            s = sample(a.pid)
            if s["n_procs"] == 1 and s["rss_bytes"] == 0:  # the server is gone
                break
            f.write(json.dumps({"t": round(time.monotonic() - t0, 3), **s}) + "\n")
            f.flush()
            time.sleep(a.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
