"""``MoEWeights``: the runtime layout of one MoE layer's experts, and ``prepare_experts`` (canonical -> runtime)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mxserve_kernels._common.layout import PackedWeights, pack_projection
from mxserve_kernels.formats import WeightScheme


@dataclass
class MoEWeights:
    """Experts of one MoE layer in the runtime layout (``_common/layout.py``).

    Attributes:
        w13: gate_up projection, [2I, H] per expert (gate rows first).
        w2: down projection, [H, I] per expert.
        hidden: H. inter: I.
    """

    w13: PackedWeights
    w2: PackedWeights
    hidden: int
    inter: int

    @property
    def num_experts(self) -> int:
        return self.w13.num_experts

    def tensors(self) -> dict[str, torch.Tensor]:
        """Buffers to register on a module: ``w13_<field>`` and ``w2_<field>``."""
        return {**self.w13.tensors("w13_"), **self.w2.tensors("w2_")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, hidden: int, inter: int) -> "MoEWeights":
        """Inverse of ``tensors``."""
        return cls(PackedWeights.from_tensors(tensors, n=2 * inter, k=hidden, prefix="w13_"),
                   PackedWeights.from_tensors(tensors, n=hidden, k=inter, prefix="w2_"), hidden, inter)

    def to(self, device) -> "MoEWeights":
        return MoEWeights(self.w13.to(device), self.w2.to(device), self.hidden, self.inter)


def prepare_experts(gate_up: Sequence[tuple[WeightScheme, dict[str, torch.Tensor]]],
                    down: Sequence[tuple[WeightScheme, dict[str, torch.Tensor]]], *, hidden: int, inter: int,
                    device=None) -> MoEWeights:
    """The one conversion canonical -> runtime layout for a MoE layer.

    Args:
        gate_up: per expert e, (scheme, canonical tensors) of the [2I, H] weight = row-concat(gate, up) of every
            tensor (gate rows first).
        down: per expert e, (scheme, canonical tensors) of the [H, I] weight.
        hidden, inter: H, I.
        device: target device (default: that of the tensors).
    Returns:
        MoEWeights. Experts may all differ in scheme.
    """
    if len(gate_up) != len(down):
        raise ValueError(f"prepare_experts: {len(gate_up)} gate_up experts but {len(down)} down experts")
    w13 = pack_projection(gate_up, n=2 * inter, k=hidden, device=device, where="gate_up")
    w2 = pack_projection(down, n=hidden, k=inter, device=device, where="down")
    return MoEWeights(w13, w2, hidden, inter)
