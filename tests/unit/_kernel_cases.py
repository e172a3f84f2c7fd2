"""Shared builders for the kernel tests (unit tier under TRITON_INTERPRET=1, and the GPU tier)."""
from __future__ import annotations

import torch

from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme


def make_experts(schemes: list[str], hidden: int, inter: int, device="cpu", seed: int = 0):
    """Canonical (gate_up, down) lists for ``prepare_experts``: expert e uses ``schemes[e]`` for both."""
    g = torch.Generator().manual_seed(seed)
    gate_up, down = [], []
    for name in schemes:
        s = WeightScheme.parse(name)
        gate_up.append((s, random_canonical(s, 2 * inter, hidden, device=device, generator=g)))
        down.append((s, random_canonical(s, hidden, inter, device=device, generator=g)))
    return gate_up, down


def make_routing(t: int, k: int, e: int, kind: str, device="cpu", seed: int = 0):
    """topk (weights fp32 [T, K], ids int64 [T, K]) for a named routing pattern.

    kind: "random" (distinct experts per token), "one_expert" (every token's slot 0 on expert 0, others random),
    "skip_half" (only even experts get tokens: odd experts are empty).
    """
    g = torch.Generator().manual_seed(seed)
    pool = list(range(0, e, 2)) if kind == "skip_half" else list(range(e))
    ids = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:k]] for _ in range(t)])
    if kind == "one_expert":
        ids = torch.stack([torch.cat([torch.tensor([0]), torch.tensor([x for x in torch.randperm(e, generator=g)
                                                                         .tolist() if x != 0][:k - 1])])
                           for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    w = w / w.sum(-1, keepdim=True)
    return w.to(device), ids.to(device)
