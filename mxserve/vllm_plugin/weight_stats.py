"""Worker-side weight metrics of an ``mxmoe`` model: bytes by storage precision and the quant-config info gauge.

Every method's ``process_weights_after_loading`` (mxmoe linears and experts, the bf16 linears and embeddings the
config hands out) calls :func:`record` with its layer's bytes and element counts per precision; each call republishes
this process's totals through :func:`mxserve.metrics.sidechannel.publish` (section ``"quant"``, written at once, so
the snapshot is complete after the last layer without a shutdown hook). The API server's collector turns them into
``mxserve:worker_weight_bytes{precision=...}`` and ``mxserve:quant_config_info{weight_bits_mix, kv_bits, offload,
scheme}``. Metrics never take the worker down: failures are logged and ignored.

Precision labels: ``int{B}`` (plain B-bit codes, scales/zeros included), ``int{B}_nested`` (MWQ int2 base + planes
served at B bits), ``bf16`` / ``fp16`` / ``fp32`` (unquantized tensors).
"""
from __future__ import annotations

import logging
import threading

import torch

from mxserve_kernels.formats import WeightScheme

logger = logging.getLogger("mxserve.metrics")

SECTION = "quant"
KEEPALIVE_S = 120.0  # rewrite the snapshot this often: readers drop snapshots older than 600 s (static values)
_lock = threading.Lock()
_keepalive: list[threading.Thread] = []
# layer prefix -> {precision: (bytes, elements, bits per element of the stored weight)}
_layers: dict[str, dict[str, tuple[int, int, int]]] = {}
_seen_storage: dict[int, str] = {}  # storage pointer -> layer prefix (a tied lm_head shares the embedding's table)

_DTYPE_LABEL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def precision_label(scheme: WeightScheme | None, dtype: torch.dtype | None = None) -> str:
    """``int4`` / ``int2_nested`` for a quantized scheme; ``bf16`` / ``fp16`` / ... for unquantized tensors."""
    if scheme is not None and scheme.bits != 16:
        return f"int{scheme.bits}" + ("_nested" if scheme.nested else "")
    return _DTYPE_LABEL.get(dtype, str(dtype).removeprefix("torch.")) if dtype is not None else "bf16"


def module_bytes(module: torch.nn.Module) -> tuple[int, int, torch.dtype | None]:
    """(bytes, elements, dtype of the largest tensor) of a module's own parameters (not its children)."""
    tensors = [p for p in module.parameters(recurse=False)]
    if not tensors:
        return 0, 0, None
    big = max(tensors, key=lambda t: t.numel())
    return sum(t.numel() * t.element_size() for t in tensors), sum(t.numel() for t in tensors), big.dtype


def quant_info(cfg, bits_elements: dict[int, int]) -> dict[str, str]:
    """The ``quant_config`` info labels.

    Args:
        cfg: the ``MxMoEConfig`` (plan). bits_elements: weight elements per stored bit width (16 for unquantized).
    Returns:
        {"weight_bits_mix": "2:0.75,3:0.20,16:0.05" (element fractions), "kv_bits": mean K/V bits or "auto",
         "offload": "on"|"off", "scheme": "nested"|"mixed"|"uniform"|"bf16"}.
    """
    total = sum(bits_elements.values())
    mix = ",".join(f"{b}:{n / total:.2f}" for b, n in sorted(bits_elements.items()) if n) if total else ""
    kv = getattr(cfg, "kv", None)
    if kv:
        layers = kv.get("layers") or []
        vals = [(float(lc["k_bits"]) + float(lc["v_bits"])) / 2 for lc in layers]
        kv_bits = f"{sum(vals) / len(vals):g}" if vals else "auto"
    else:
        kv_bits = "auto"
    schemes = set(cfg.modules.values()) | {s for p in cfg.experts.values() for s in (*p.gate_up, *p.down)}
    quantized = {s for s in schemes if s.bits != 16}
    if any(s.nested for s in quantized):
        kind = "nested"
    elif len(quantized) > 1:
        kind = "mixed"
    elif quantized:
        kind = "uniform"
    else:
        kind = "bf16"
    return {"weight_bits_mix": mix, "kv_bits": kv_bits, "offload": "on" if getattr(cfg, "offload", None) else "off",
            "scheme": kind}


def totals() -> tuple[dict[str, float], dict[int, int]]:
    """This process's (bytes per precision, elements per bit width) over every recorded layer."""
    by_prec: dict[str, float] = {}
    by_bits: dict[int, int] = {}
    with _lock:
        for per in _layers.values():
            for prec, (nbytes, elems, bits) in per.items():
                by_prec[prec] = by_prec.get(prec, 0) + nbytes
                by_bits[bits] = by_bits.get(bits, 0) + elems
    return by_prec, by_bits


def record(prefix: str, per_precision: dict[str, tuple[int, int, int]], cfg) -> None:
    """Store one layer's ``{precision: (bytes, elements, bits)}`` (replacing an earlier record of the same layer)
    and publish this process's totals. Never raises."""
    try:
        with _lock:
            _layers[prefix] = dict(per_precision)
        by_prec, by_bits = totals()
        from mxserve.metrics import sidechannel
        sidechannel.publish(SECTION, {"weight_bytes": by_prec, "quant_config": quant_info(cfg, by_bits)},
                            min_interval_s=0.0)
        _start_keepalive()
    except Exception as e:  # metrics must never break model loading
        logger.warning("mxserve metrics: cannot publish weight stats for %s: %s", prefix, e)


def record_lazy(prefix: str, compute, cfg) -> None:
    """:func:`record` of ``compute()`` (a callable returning the per-precision dict); never raises."""
    try:
        per = compute()
    except Exception as e:  # metrics must never break model loading
        logger.warning("mxserve metrics: cannot size %s: %s", prefix, e)
        return
    record(prefix, per, cfg)


def _refresh_forever() -> None:
    import time

    from mxserve.metrics import sidechannel
    while True:
        time.sleep(KEEPALIVE_S)
        try:
            sidechannel.flush()
        except Exception as e:  # pragma: no cover - defensive
            logger.debug("mxserve metrics: keepalive flush failed: %s", e)


def _start_keepalive() -> None:
    """One daemon thread per process that rewrites the snapshot every KEEPALIVE_S (weights never change, but the
    collector treats a snapshot older than its stale limit as gone)."""
    with _lock:
        if _keepalive:
            return
        t = threading.Thread(target=_refresh_forever, name="mxserve-metrics-keepalive", daemon=True)
        _keepalive.append(t)
    t.start()


def record_unquantized(prefix: str, layer: torch.nn.Module, cfg) -> None:
    """Record an unquantized layer (bf16 linear, embedding, lm_head) from its own parameters."""
    try:
        ptrs = {p.untyped_storage().data_ptr() for p in layer.parameters(recurse=False)}
        with _lock:
            if any(_seen_storage.get(q, prefix) != prefix for q in ptrs):
                return  # shares its storage with a layer already counted (tied weights)
            _seen_storage.update({q: prefix for q in ptrs})
        nbytes, elems, dtype = module_bytes(layer)
    except Exception as e:  # pragma: no cover - defensive
        logger.warning("mxserve metrics: cannot size %s: %s", prefix, e)
        return
    if elems:
        record(prefix, {precision_label(None, dtype): (nbytes, elems, dtype.itemsize * 8)}, cfg)


def _reset_for_tests() -> None:
    with _lock:
        _layers.clear()
        _seen_storage.clear()
