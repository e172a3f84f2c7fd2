"""Typed, versioned configuration objects (no vllm imports)."""
from mxserve.config.quant_config import CONFIG_VERSION, ExpertPlan, MxMoEConfig, QuantConfigError

__all__ = ["CONFIG_VERSION", "ExpertPlan", "MxMoEConfig", "QuantConfigError"]
