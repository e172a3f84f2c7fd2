"""Router statistics: how often each expert of each MoE layer is routed to on calibration data."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RouterStats:
    """Routing-event counts per layer (top-k included).

    Attributes:
        counts: {layer: [E] float64 routing events}.
        tokens: {layer: number of tokens seen}.
    """

    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)

    def update(self, layer: int, topk_idx: torch.Tensor, num_experts: int) -> None:
        """Add one batch of routing decisions ``topk_idx`` [T, K]."""
        c = torch.bincount(topk_idx.reshape(-1).cpu(), minlength=num_experts).double()
        self.counts[layer] = self.counts.get(layer, torch.zeros(num_experts, dtype=torch.float64)) + c
        self.tokens[layer] = self.tokens.get(layer, 0) + topk_idx.shape[0]

    def frequency(self, layer: int) -> torch.Tensor:
        """[E] fraction of tokens routed to each expert (sums to top_k)."""
        return self.counts[layer] / max(self.tokens[layer], 1)

    def tokens_per_expert(self, layer: int, batch_tokens: int) -> list[int]:
        """M_e = round(B * count_e / T): tokens each expert's GEMM sees at a serving batch of B tokens."""
        return [int(round(batch_tokens * float(f))) for f in self.frequency(layer)]

    def to_dict(self) -> dict:
        return {str(l): {"tokens": self.tokens[l], "counts": [int(c) for c in self.counts[l]]}
                for l in sorted(self.counts)}
