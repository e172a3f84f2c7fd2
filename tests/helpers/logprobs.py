"""KL divergence from full-vocabulary prompt logprobs as vLLM returns them (GPU tests)."""
from __future__ import annotations

import math


def mean_prompt_kld(ref: list[list[dict]], test: list[list[dict]]) -> tuple[float, int]:
    """Mean KL(ref || test) over every prompt position.

    Args:
        ref, test: per prompt, per position, ``{token: logprob}`` dicts (full vocabulary for ``ref``); a token
            missing from a ``test`` dict gets that position's lowest ``test`` logprob.
    Returns:
        (mean KLD in nats, number of positions).
    """
    klds = []
    for ps, qs in zip(ref, test):
        for p, q in zip(ps, qs):
            floor = min(q.values())
            klds.append(sum(math.exp(lp) * (lp - q.get(t, floor)) for t, lp in p.items()))
    return sum(klds) / len(klds), len(klds)
