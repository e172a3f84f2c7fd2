"""Bits-per-element accounting of the quantized KV cache: codes + fp16 scale/zero + slot padding, and the
full-precision zones (sinks + recent window, kept in bf16 next to the packed copy) at a given context length."""
from __future__ import annotations

from mxserve_kernels.attention.kv_format import KVSlotFormat, parse_kv_label

from mxserve.kvcache.config import KVQuantConfig

FP_BITS = 16  # bf16 / fp16 full-precision zones and the unquantized baseline

# default groups per bit width (per-token groups along D): finer groups at low K bits
DEFAULT_GROUPS = {8: 128, 4: 128, 2: 64, 1.5: 128}


def default_format(label: str, head_dim: int) -> KVSlotFormat:
    """Slot format of a ``"K2V1.5"``-style label with the default groups (clamped to head_dim)."""
    kb, vb = parse_kv_label(label)
    kg = min(DEFAULT_GROUPS[kb], head_dim)
    vg = min(DEFAULT_GROUPS[vb], head_dim)
    return KVSlotFormat(head_dim, k_bits=kb, v_bits=vb, k_group=kg, v_group=vg)


def fp_zone_tokens(context_len: int, sink: int, window: int) -> int:
    """Tokens of a context held in full precision (sinks and window overlap on short contexts)."""
    return min(context_len, sink + window)


def effective_bits(fmt: KVSlotFormat, context_len: int, sink: int = 4, window: int = 128,
                   fp_zones_stored: bool = True) -> float:
    """Average stored bits per K/V element of one layer at ``context_len`` tokens.

    Args:
        fp_zones_stored: count the bf16 copies of the sink/window tokens (stored next to the packed slots).
    """
    d2 = 2 * fmt.head_dim
    packed = context_len * fmt.slot_bytes * 8
    fp = fp_zone_tokens(context_len, sink, window) * d2 * FP_BITS if fp_zones_stored else 0
    return (packed + fp) / (context_len * d2)


def model_bits(cfg: KVQuantConfig, head_dim: int, context_len: int | None = None) -> float:
    """Average bits per element over all layers (packed only when ``context_len`` is None)."""
    tot = 0.0
    for lc in cfg.layers:
        fmt = lc.slot_format(head_dim)
        tot += fmt.bits_per_element() if context_len is None else effective_bits(
            fmt, context_len, cfg.sink_tokens, cfg.window_tokens)
    return tot / len(cfg.layers)


def bits_table(labels: list[str], head_dim: int, context_lens: list[int], sink: int = 4, window: int = 128
               ) -> list[dict]:
    """One row per label: slot bytes, packed bits/elem, capacity vs bf16, bits with FP zones per context length."""
    rows = []
    for lab in labels:
        f = default_format(lab, head_dim)
        row = {"config": lab, "head_dim": head_dim, "k_group": f.k_group, "v_group": f.v_group,
               "slot_bytes": f.slot_bytes, "packed_bits": round(f.bits_per_element(), 4),
               "capacity_vs_bf16": round(f.compression_vs(2), 3)}
        for n in context_lens:
            row[f"bits_fp_zones@{n}"] = round(effective_bits(f, n, sink, window), 4)
        rows.append(row)
    return rows
