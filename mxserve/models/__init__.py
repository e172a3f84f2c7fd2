"""Model architecture knowledge shared by quantization, the embedded engine and the vLLM plugin (no vllm)."""
from mxserve.models.arch import ARCHS, MoEArch, arch_for_config

__all__ = ["ARCHS", "MoEArch", "arch_for_config"]
