"""``mxmoe`` QuantizationConfig for vLLM 0.26 (placeholder until the vllm-plugin methods land)."""
from __future__ import annotations

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from mxserve.config import MxMoEConfig


@register_quantization_config("mxmoe")
class MxMoEQuantConfig(QuantizationConfig):
    """Reads the checkpoint's ``quantization_config`` (see ``mxserve.config.quant_config``)."""

    def __init__(self, cfg: MxMoEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MxMoEConfig()

    def get_name(self) -> str:
        return "mxmoe"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> "MxMoEQuantConfig":
        return cls(MxMoEConfig.from_dict(config))

    def get_quant_method(self, layer, prefix: str):
        raise NotImplementedError(
            f"mxserve: the mxmoe layer methods are not implemented yet (layer {prefix!r}); "
            "this build only registers the quantization name")
