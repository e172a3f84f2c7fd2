"""Tuned launch configs: JSON files written by ``mxserve_kernels/bench/tune_moe.py``, read by the launchers.

File ``moe/configs/E=<E>,H=<H>,I=<I>,device_name=<dev>.json`` (dense linears: ``E=1,N=<N>,K=<K>,...``) maps a token
count M (string key) to ``{"w13": cfg, "w2": cfg}`` (dense: ``{"w": cfg}``), cfg = ``{BLOCK_M, BLOCK_N, BLOCK_K,
num_warps, num_stages}``; lookup takes the nearest key. An entry may add per-precision configs
``"by_bits": {"2": {"w13": cfg, "w2": cfg}, "3": ...}`` keyed by the projection's dominant storage width
(``dominant_bits``); the plain entry is the W4-tuned one and the fallback for any width without its own entry. The
format is additive (files without ``by_bits`` read as before; readers that ignore ``by_bits`` still get the W4
entry), so the files carry no version field: they stay vLLM-style T-keyed tuning tables. Without a file, ``default_config`` applies (documented in
docs/kernels.md): decode (<= 4 rows per expert on average) BLOCK_M 16 / BLOCK_N 32 / BLOCK_K 16 / 4 warps /
3 stages; mid BLOCK_M 32 / 64 / 16; prefill BLOCK_M 64 / BLOCK_N 128 / BLOCK_K 32 / 8 warps / 2 stages. BLOCK_K is the K
extent of one tl.dot (code words per step for integer experts). The serving path never autotunes.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Iterable

from mxserve_kernels._common.layout import KIND_BF16, KIND_NONE

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "moe", "configs")
CFG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
REFERENCE_BITS = 4  # the plain entries are tuned on uniform W4 layers


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


def dominant_bits(rows: Iterable[tuple[int, int]]) -> int:
    """The storage width a projection's launch config is keyed by: the bits-weighted majority of its experts.

    Each live expert adds its storage width B to its width's total (int1/2/4/8: B; int3: 3; nested: its runtime
    prefix, the total bits its K loop reads; bf16: 16); the width with the largest total wins (ties: the wider).
    E.g. 96 int2 + 32 int4 experts: 192 vs 128 -> 2. Experts without weights (KIND_NONE) do not count.

    Args:
        rows: per expert (kind, bits) = einfo columns F_KIND, F_BITS.
    Returns:
        the dominant width; REFERENCE_BITS (4) when no expert has weights.
    """
    totals: dict[int, int] = {}
    for kind, bits in rows:
        if int(kind) == KIND_NONE:
            continue
        b = 16 if int(kind) == KIND_BF16 else int(round(float(bits)))
        totals[b] = totals.get(b, 0) + b
    if not totals:
        return REFERENCE_BITS
    return max(totals, key=lambda b: (totals[b], b))


def projection_bits(pw) -> int:
    """``dominant_bits`` of a ``PackedWeights``, computed once when it was built (``_dominant_bits``). Weights built
    with an explicit ``kinds`` mask (views built inside forwards, e.g. slot-pool views) and fake tensors have none:
    REFERENCE_BITS, unless their builder stored ``_dominant_bits``."""
    bits = getattr(pw, "_dominant_bits", None)
    return REFERENCE_BITS if bits is None else bits


def _check_entry(entry, path: str, where: str, projs: tuple[str, ...] | None = None) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} must be an object, got {type(entry).__name__}")
    for proj, cfg in entry.items():
        if proj == "by_bits":
            continue
        if projs is not None and proj not in projs:
            raise ValueError(f"{path}: {where}: unknown projection {proj!r} (expected {projs})")
        missing = [c for c in CFG_KEYS if not isinstance(cfg, dict) or not isinstance(cfg.get(c), int)]
        if missing:
            raise ValueError(f"{path}: {where}.{proj} lacks integer {missing}")


@functools.lru_cache(maxsize=64)
def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    table = {}
    for m, entry in data.items():
        try:
            table[int(m)] = entry
        except ValueError:
            raise ValueError(f"{path}: key {m!r} is not a token count") from None
        _check_entry(entry, path, f"[{m}]")
        by_bits = entry.get("by_bits", {})
        if not isinstance(by_bits, dict) or not all(str(b).isdigit() for b in by_bits):
            raise ValueError(f"{path}: [{m}].by_bits must map a bit width to {{'w13': .., 'w2': ..}}")
        for b, sub in by_bits.items():
            _check_entry(sub, path, f"[{m}].by_bits[{b}]", tuple(k for k in entry if k != "by_bits") or None)
    return table


def lookup(key: dict[str, int], m: int, dev: str | None = None, bits: int = REFERENCE_BITS) -> dict | None:
    """Tuned entry (``{"w13":..,"w2":..}`` or ``{"w":..}``) for the nearest M, or None when no file exists.

    Args:
        key: shape key of the file name ({"E","H","I"} or {"E","N","K"}). m: token count.
        dev: device name (default: this CUDA device). bits: the dominant storage width (``dominant_bits``).
    Returns:
        the nearest M's ``by_bits[bits]`` entry when it has one, else its plain entry; None when there is no file
        or the nearest entry holds neither (e.g. a file written by a per-precision-only tuning run).
    """
    table = _load(os.path.join(CONFIG_DIR, config_filename(key, dev or device_name())))
    if not table:
        return None
    best = table[min(table, key=lambda t: (abs(t - m), t))]
    sub = best.get("by_bits", {}).get(str(bits))
    if sub:
        return sub
    plain = {p: c for p, c in best.items() if p != "by_bits"}
    return plain or None


def merge_tables(old: dict, new: dict) -> dict:
    """Tuning tables merged entry by entry (string T keys, sorted numerically): ``new``'s plain configs and
    ``by_bits`` widths replace ``old``'s, everything else of ``old`` stays (token counts or widths not re-tuned)."""
    out = {t: {**e, "by_bits": dict(e.get("by_bits", {}))} for t, e in old.items()}
    for t, e in new.items():
        cur = out.setdefault(t, {"by_bits": {}})
        cur.update({p: c for p, c in e.items() if p != "by_bits"})
        cur["by_bits"].update(e.get("by_bits", {}))
    for e in out.values():
        if not e["by_bits"]:
            del e["by_bits"]
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def write_json_atomic(path: str, data) -> None:
    """Write JSON via a temp file and rename (never a half-written config)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
