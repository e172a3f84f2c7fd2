"""Offline KV-cache quantization: config schema (``config``), bit accounting (``bits``), calibration algorithms
(``calibrate``: channel order, clip search, per-layer K/V bit search) and activation capture (``capture``)."""
from mxserve.kvcache.config import KV_CONFIG_VERSION, KVConfigError, KVLayerConfig, KVQuantConfig

__all__ = ["KV_CONFIG_VERSION", "KVConfigError", "KVLayerConfig", "KVQuantConfig"]
