"""Kernel cost model used by the bit allocator: time of one expert GEMM under a scheme.

``expert_gemm_time_us(scheme_name, m, n, k)`` reads a measured table (written by the kernels' tuner to
``mxserve_kernels/moe/configs/cost_table_<device>.json``) when one exists for the device, otherwise falls back to
a documented roofline default (H200: 4.3 TB/s copy bandwidth measured, 790 TFLOP/s bf16 dense).
"""
from __future__ import annotations

import functools
import json
import math
import os

from mxserve_kernels.formats import WeightScheme

# Roofline default, H200 (measured copy bandwidth and bf16 matmul rate on the lent machine, docs/results).
DEFAULT_BW_BYTES_PER_US = 4.3e12 / 1e6
DEFAULT_FLOPS_PER_US = 790e12 / 1e6
DEFAULT_LAUNCH_US = 3.0
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def _device_slug(device_name: str) -> str:
    return device_name.replace(" ", "_").replace("/", "_")


@functools.lru_cache(maxsize=8)
def load_cost_table(device_name: str = "NVIDIA H200") -> dict | None:
    """The measured cost table for a device, or None. Schema: {"device", "schemes": {name: {"points": [[m, n, k,
    us], ...]}}}; lookups interpolate in m for the nearest (n, k)."""
    path = os.path.join(CONFIG_DIR, f"cost_table_{_device_slug(device_name)}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def roofline_time_us(scheme_name: str, m: int, n: int, k: int) -> float:
    """max(bytes / bandwidth, flops / peak) + launch share; bytes = weights (with metadata) + activations."""
    s = WeightScheme.parse(scheme_name)
    wbytes = s.storage_bytes(n, k)
    abytes = 2 * m * (n + k)
    flops = 2.0 * m * n * k
    return max((wbytes + abytes) / DEFAULT_BW_BYTES_PER_US, flops / DEFAULT_FLOPS_PER_US)


def expert_gemm_time_us(scheme_name: str, m: int, n: int, k: int, device_name: str = "NVIDIA H200") -> float:
    """Estimated microseconds for one expert's [m, k] x [k, n] GEMM at ``scheme_name`` (0 if m == 0: no tiles)."""
    if m <= 0:
        return 0.0
    table = load_cost_table(device_name)
    if table is not None:
        pts = table.get("schemes", {}).get(scheme_name, {}).get("points")
        if pts:
            best = min(pts, key=lambda p: (abs(math.log(p[1] * p[2]) - math.log(n * k)), abs(p[0] - m)))
            # scale the nearest measured point by work ratio (weights dominate at small m, flops at large m)
            return best[3] * max(m / max(best[0], 1), 1.0) ** 0.5 * (n * k) / (best[1] * best[2])
    return roofline_time_us(scheme_name, m, n, k)
