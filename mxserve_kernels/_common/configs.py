"""Tuned launch configs: JSON files written by ``mxserve_kernels/bench/tune_moe.py``, read by the launchers.

File ``moe/configs/E=<E>,H=<H>,I=<I>,device_name=<dev>.json`` (dense linears: ``E=1,N=<N>,K=<K>,...``) maps a token
count M (string key) to ``{"w13": cfg, "w2": cfg}`` (dense: ``{"w": cfg}``), cfg = ``{BLOCK_M, BLOCK_N, BLOCK_K,
num_warps, num_stages}``; lookup takes the nearest key. Without a file, ``default_config`` applies (documented in
docs/kernels.md): decode (<= 4 rows per expert on average) BLOCK_M 16 / BLOCK_N 32 / BLOCK_K 16 / 4 warps /
3 stages; mid BLOCK_M 32 / 64 / 16; prefill BLOCK_M 64 / BLOCK_N 128 / BLOCK_K 32 / 8 warps / 2 stages. BLOCK_K is the K
extent of one tl.dot (code words per step for integer experts). The serving path never autotunes.
"""
from __future__ import annotations

import functools
import json
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "moe", "configs")
CFG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")


def device_name() -> str:
    """CUDA device name with spaces as underscores ('cpu' without CUDA)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    except Exception:  # pragma: no cover - torch without CUDA runtime
        pass
    return "cpu"


def config_filename(key: dict[str, int], dev: str) -> str:
    return ",".join(f"{k}={v}" for k, v in key.items()) + f",device_name={dev}.json"


def default_config(rows_per_expert: float) -> dict[str, int]:
    """The documented default when no tuned file matches (rows_per_expert = T*K/E, or M for a dense linear).

    BLOCK_K is the K extent of one tl.dot: code words per iteration for integer experts (BLOCK_K * 32/B K rows),
    2*BLOCK_K K rows for bf16 experts (``moe/grouped_gemm_kernels.py``)."""
    if rows_per_expert <= 4:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=3)
    if rows_per_expert <= 48:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=2)


@functools.lru_cache(maxsize=64)
def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    return {int(m): v for m, v in data.items()}


def lookup(key: dict[str, int], m: int, dev: str | None = None) -> dict | None:
    """Tuned entry (``{"w13":..,"w2":..}`` or ``{"w":..}``) for the nearest M, or None when no file exists."""
    table = _load(os.path.join(CONFIG_DIR, config_filename(key, dev or device_name())))
    if not table:
        return None
    best = min(table, key=lambda t: (abs(t - m), t))
    return table[best]


def write_json_atomic(path: str, data) -> None:
    """Write JSON via a temp file and rename (never a half-written config)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
