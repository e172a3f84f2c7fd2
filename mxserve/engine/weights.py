"""Load an HF MoE checkpoint directory (bf16 or mxmoe) into plain CPU torch tensors for the embedded engine.

Quantized modules (``<module>.qweight`` ... in the canonical format of ``mxserve_kernels.formats``) are
dequantized once at load through ``mxserve_kernels.quant.reference.dequantize``. This is the simplest robust CPU
path; the fused path (``mxserve_kernels.quant.prepare_linear`` / ``dequant_linear`` and
``mxserve_kernels.moe.prepare_experts`` / ``fused_moe``) plugs in at :meth:`CheckpointReader.linear` and
:func:`mxserve.engine.model.moe_forward` once those land.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.config.quant_config import QUANT_METHOD, MxMoEConfig
from mxserve_kernels.formats import NESTED_BASE_BITS, WeightScheme, tensor_names
from mxserve_kernels.quant.reference import dequantize


def read_config(model_dir: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict; FileNotFoundError / ValueError naming the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is {model_dir} an HF model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None


def quant_config_of(cfg: dict) -> MxMoEConfig | None:
    """The parsed mxmoe ``quantization_config`` of a config.json dict, or None for an unquantized checkpoint."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    if str(qc.get("quant_method", "")).lower() != QUANT_METHOD:
        raise ValueError(f"config.json quantization_config.quant_method={qc.get('quant_method')!r}: the embedded "
                         f"engine serves bf16 and '{QUANT_METHOD}' checkpoints only")
    return MxMoEConfig.from_dict(qc)


def precision_label(scheme: WeightScheme) -> str:
    """Metric label of a storage precision: ``bf16``, ``int4``, ``int2_nested4`` ..."""
    if scheme.bits == 16:
        return "bf16"
    return f"int{NESTED_BASE_BITS}_nested{scheme.bits}" if scheme.nested else f"int{scheme.bits}"


class CheckpointReader:
    """Tensor access over every ``*.safetensors`` file of a model directory, with load-time dequantization.

    Args:
        model_dir: HF directory (config.json + safetensors shards).
        quant: parsed mxmoe config, or None (every linear is a plain ``<module>.weight``).
        dtype: compute dtype of returned tensors (the engine runs fp32 on CPU).
    Attributes:
        weight_bytes: storage bytes of the checkpoint tensors by precision label (for ``mxserve:weight_bytes``).
    """

    def __init__(self, model_dir: str | Path, quant: MxMoEConfig | None, dtype: torch.dtype = torch.float32):
        self.dir = Path(model_dir)
        self.quant = quant
        self.dtype = dtype
        self.weight_bytes: dict[str, int] = defaultdict(int)
        self._ckpt = HFCheckpoint(self.dir)  # the one safetensors-directory reader (index or single file)

    def has(self, name: str) -> bool:
        return self._ckpt.has(name)

    def raw(self, name: str) -> torch.Tensor:
        """One stored tensor as saved (no dtype change); ValueError naming tensor and directory if missing."""
        return self._ckpt.tensor(name)

    def get(self, name: str, account: str | None = "bf16") -> torch.Tensor:
        """A plain tensor cast to the compute dtype; its stored bytes are counted under ``account``."""
        t = self.raw(name)
        if account:
            self.weight_bytes[account] += t.numel() * t.element_size()
        return t.to(self.dtype)

    def opt(self, name: str) -> torch.Tensor | None:
        return self.get(name) if self.has(name) else None

    def linear(self, module: str, scheme: WeightScheme | None = None) -> torch.Tensor:
        """Dequantized ``[N, K]`` weight of linear ``module`` (HF name without suffix) in the compute dtype.

        Args:
            module: e.g. ``model.layers.0.self_attn.q_proj``.
            scheme: its scheme; None = look it up in the quant config (dense modules) or bf16.
        Returns:
            [N, K] tensor.
        """
        if scheme is None:
            scheme = self.quant.scheme_for(module) if self.quant else WeightScheme(bits=16)
        if scheme.bits == 16 or not self.has(f"{module}.qweight"):
            if not self.has(f"{module}.weight"):
                raise KeyError(f"{self.dir}: linear {module!r} has neither '.weight' nor '.qweight' "
                               f"(scheme {scheme.name})")
            return self.get(f"{module}.weight")
        tensors = {n: self.raw(f"{module}.{n}") for n in tensor_names(scheme)}
        self.weight_bytes[precision_label(scheme)] += sum(t.numel() * t.element_size() for t in tensors.values())
        base_bits = NESTED_BASE_BITS if scheme.nested else scheme.bits
        k = tensors["qweight"].shape[1] * 8 // base_bits
        return dequantize(scheme, tensors, k, out_dtype=self.dtype)

    def expert_schemes(self, experts_prefix: str, expert: int) -> tuple[WeightScheme | None, WeightScheme | None]:
        """(gate_up, down) schemes of one expert from the quant config; (None, None) when unplanned."""
        plan = self.quant.experts.get(experts_prefix) if self.quant else None
        if plan is None:
            return None, None
        if expert >= plan.num_experts:
            raise ValueError(f"quantization_config.experts[{experts_prefix!r}] plans {plan.num_experts} experts, "
                             f"checkpoint needs expert {expert}")
        return plan.gate_up[expert], plan.down[expert]
