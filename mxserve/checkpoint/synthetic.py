"""A random-weight checkpoint that exists only in memory: tensors generated on request, on the device.

``SyntheticCheckpoint("qwen3-30b-a3b", layers=48)`` has the config, tensor names and shapes of the
``mxserve.models.tiny`` preset (same as ``mxserve make-tiny --preset``) but never writes or reads a bf16 file:
``tensor(name)`` draws the values from a generator seeded by (seed, name), so the quantization driver, which
materialises one decoder layer at a time, sees the same weights in both of its passes. Used by
``mxserve quantize --synthetic-source PRESET --layers N`` to time the real geometry within the disk budget.
Quacks like ``HFCheckpoint`` for a plain bf16 source (``quant`` is None).
"""
from __future__ import annotations

import pathlib
import zlib

import torch

from mxserve.models.arch import MoEArch, arch_for_config

INIT_STD = 0.02


class SyntheticCheckpoint:
    """In-memory random bf16 checkpoint of a ``mxserve.models.tiny.PRESETS`` geometry.

    Args:
        preset: a key of ``PRESETS`` (e.g. "qwen3-30b-a3b").
        layers: decoder layers (overrides the preset's count).
        seed: base seed; tensor ``name`` uses ``seed * 1_000_003 + crc32(name)``.
        device: where tensors are generated (default cuda when present): weights never pass through the host.
        overrides: extra config kwargs (e.g. smaller dims for tests).
    Raises:
        ValueError naming the preset if unknown.
    """

    def __init__(self, preset: str, layers: int, seed: int = 0, device=None, overrides: dict | None = None):
        from mxserve.models.tiny import PRESETS, build_config, hub_tensor_shapes
        if preset not in PRESETS:
            raise ValueError(f"--synthetic-source {preset!r}: unknown preset; choose from {sorted(PRESETS)}")
        if layers < 1:
            raise ValueError(f"--layers {layers}: must be >= 1")
        arch_name, kw = PRESETS[preset]
        cfg = build_config(arch_name, dict(kw, num_hidden_layers=layers, **(overrides or {})))
        self.config: dict = cfg.to_dict()
        self.arch: MoEArch = arch_for_config(self.config)
        self.geometry = self.arch.geometry(self.config)
        self.shapes: dict[str, tuple[int, ...]] = dict(hub_tensor_shapes(arch_name, cfg))
        self.weight_map = {n: "<synthetic>" for n in self.shapes}
        self.path = pathlib.Path(f"synthetic-{preset}-{layers}L")   # label only: nothing is read from it
        self.quant = None
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def names(self) -> list[str]:
        return list(self.shapes)

    def has(self, name: str) -> bool:
        return name in self.shapes

    def tensor(self, name: str) -> torch.Tensor:
        """bf16 tensor ``name`` on ``device`` (norm weights 1, biases 0, others N(0, 0.02)); deterministic."""
        shape = self.shapes.get(name)
        if shape is None:
            raise ValueError(f"{self.path}: tensor {name!r} is not part of the synthetic checkpoint")
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=torch.bfloat16, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=gen, device=self.device) * INIT_STD).to(torch.bfloat16)

    def scheme_of(self, module: str):
        from mxserve_kernels.formats import BF16
        return BF16

    def weight(self, module: str, shape: tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``[N, K]`` weight of linear ``module`` (HF name without suffix); shape mismatch names it."""
        w = self.tensor(f"{module}.weight").to(dtype)
        if shape is not None and tuple(w.shape) != tuple(shape):
            raise ValueError(f"{module}: weight shape {list(w.shape)}, expected {list(shape)}")
        return w

    def non_linear_names(self, layer: int | None = None) -> list[str]:
        """Every tensor name (all bf16), optionally only those of decoder layer ``layer``."""
        pre = None if layer is None else f"{self.arch.layer_prefix(layer)}."
        return [n for n in self.shapes if pre is None or n.startswith(pre)]
