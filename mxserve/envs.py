"""Every ``MXSERVE_*`` environment variable, typed and documented, in one place."""
from __future__ import annotations

import os


def _bool(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() in ("1", "true", "yes", "on")


def _str(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


# Comma list of kernel backends to refuse (forces the reference fallback), e.g. "triton_moe,triton_dequant".
def disabled_kernels() -> set[str]:
    return {s.strip() for s in (_str("MXSERVE_DISABLED_KERNELS") or "").split(",") if s.strip()}


# Directory where vLLM worker processes drop metric snapshots for the API-server collector (set by the plugin
# in process 0; inherited by children).
def metrics_dir() -> str | None:
    return _str("MXSERVE_METRICS_DIR")


# Where `mxserve serve --demo` and tests cache the demo model and its quantized variant.
def cache_dir() -> str:
    return _str("MXSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mxserve")


# Force the embedded CPU engine even when CUDA + vLLM are usable.
def force_embedded() -> bool:
    return _bool("MXSERVE_FORCE_EMBEDDED")


# Compile every Triton kernel variant a served layer can launch at load time (default on; 0 to skip, e.g. to
# shorten start-up in tests): see mxserve_kernels/warmup.py.
def kernel_warmup() -> bool:
    return _bool("MXSERVE_KERNEL_WARMUP", True)


# Log level for mxserve loggers.
def log_level() -> str:
    return (_str("MXSERVE_LOG_LEVEL") or "INFO").upper()


# Expose per-expert labels on the expert-cache metrics (high cardinality: opt-in).
def metrics_per_expert() -> bool:
    return _bool("MXSERVE_METRICS_PER_EXPERT")


# GPU tests only: an mxmoe checkpoint to serve in tests/integration/test_metrics_gpu.py (built when unset).
def test_checkpoint() -> str | None:
    return _str("MXSERVE_TEST_CHECKPOINT")


# GPU tests only: copy each `vllm serve` log of a test server here (vllm-<label>-<port>.log).
def test_log_dir() -> str | None:
    return _str("MXSERVE_TEST_LOG_DIR")


# GPU tests only: where tests dump the numbers they measured (JSON).
def test_json() -> str | None:
    return _str("MXSERVE_TEST_JSON")
