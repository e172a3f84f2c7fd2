"""Lazy reader of an HF checkpoint directory (config.json + model.safetensors or an index of shards).

Works for plain bf16 checkpoints and for mxmoe-quantized ones: ``weight(module)`` returns the float weight of a
linear either way (dequantized through ``mxserve_kernels.quant.reference.dequantize``).
"""
from __future__ import annotations

import json
import pathlib
import re

import torch

from mxserve.config.quant_config import MxMoEConfig
from mxserve.models.arch import MoEArch, arch_for_config
from mxserve_kernels.formats import BF16, WeightScheme, tensor_names
from mxserve_kernels.quant.reference import dequantize

_EXPERT_RE = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)$")


class HFCheckpoint:
    """Read-only view of an HF checkpoint directory.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or ``model.safetensors.index.json``.
    Raises:
        FileNotFoundError naming the missing file; ValueError for an unsupported architecture.
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: not found (is {self.path} an HF checkpoint directory?)")
        self.config: dict = json.loads(cfg_path.read_text())
        self.arch: MoEArch = arch_for_config(self.config)
        self.geometry = self.arch.geometry(self.config)
        idx = self.path / "model.safetensors.index.json"
        if idx.is_file():
            self.weight_map: dict[str, str] = json.loads(idx.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open
            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        qc = self.config.get("quantization_config")
        self.quant: MxMoEConfig | None = MxMoEConfig.from_dict(qc) if qc else None
        self._handles: dict = {}

    # ---- raw tensors ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.weight_map)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor (CPU). KeyError-free: raises ValueError naming the tensor and the directory."""
        fname = self.weight_map.get(name)
        if fname is None:
            raise ValueError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        if fname not in self._handles:
            from safetensors import safe_open
            p = self.path / fname
            if not p.is_file():
                raise FileNotFoundError(f"{p}: shard listed in the index is missing (needed for {name!r})")
            self._handles[fname] = safe_open(str(p), "pt")
        return self._handles[fname].get_tensor(name)

    # ---- linear weights ---------------------------------------------------------------------------------------
    def scheme_of(self, module: str) -> WeightScheme:
        """Scheme a linear module (HF name, no suffix) is stored in (bf16 for unquantized checkpoints)."""
        if self.quant is None:
            return BF16
        m = _EXPERT_RE.match(module)
        if m and m.group("prefix") in self.quant.experts:
            plan = self.quant.experts[m.group("prefix")]
            e = int(m.group("e"))
            if e >= plan.num_experts:
                raise ValueError(f"{module}: expert {e} not in quantization_config plan ({plan.num_experts} experts)")
            return plan.down[e] if m.group("proj") == self.arch.down else plan.gate_up[e]
        return self.quant.scheme_for(module)

    def module_tensors(self, module: str, scheme: WeightScheme | None = None) -> dict[str, torch.Tensor]:
        scheme = scheme or self.scheme_of(module)
        return {s: self.tensor(f"{module}.{s}") for s in tensor_names(scheme)}

    def weight(self, module: str, shape: tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[N, K]`` weight of a linear, dequantized if stored quantized.

        Args:
            module: HF module name without suffix, e.g. ``model.layers.0.mlp.experts.3.down_proj``.
            shape: expected (N, K); a mismatch raises ValueError naming the module.
        """
        scheme = self.scheme_of(module)
        t = self.module_tensors(module, scheme)
        if scheme.bits == 16:
            w = t["weight"].to(dtype)
        else:
            n = t["qweight"].shape[0]
            k = t["qweight"].shape[1] * 8 // (2 if scheme.nested else scheme.bits)
            if shape is not None:
                k = shape[1]
            if t["scales"].shape != (n, k // scheme.group_size):
                raise ValueError(f"{module}.scales: shape {list(t['scales'].shape)} does not match "
                                 f"{scheme.name} weight [{n}, {k}]")
            try:
                w = dequantize(scheme, t, k, out_dtype=dtype)
            except ValueError as e:
                raise ValueError(f"{module}: {e}") from None
        if shape is not None and tuple(w.shape) != tuple(shape):
            raise ValueError(f"{module}: weight shape {list(w.shape)}, expected {list(shape)}")
        return w

    def non_linear_names(self, layer: int | None = None) -> list[str]:
        """Tensor names that are not quantized linear parts (norms, router, embeddings...), optionally one layer."""
        pre = None if layer is None else f"{self.arch.layer_prefix(layer)}."
        suffixes = (".qweight", ".scales", ".zeros", "_weight", "_scales")
        return [n for n in self.weight_map if (pre is None or n.startswith(pre)) and not n.endswith(suffixes)]
