"""Sampling parameters and the per-sequence sampler (temperature, top-p, seed, logprobs)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Below this temperature sampling is greedy (argmax), as in vLLM.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (validated; ValueError names the field).

    Args:
        max_tokens: generated tokens at most (>= 1).
        temperature: 0 = greedy.
        top_p: nucleus mass in (0, 1].
        seed: per-request RNG seed (choice i uses ``seed + i``); None = engine RNG.
        stop: stop strings (not included in the output).
        stop_token_ids: extra token ids that end generation.
        logprobs: number of top logprobs to return per token (0..20), None = no logprobs.
        ignore_eos: keep generating past EOS.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


@dataclass
class Sampled:
    """One sampled token: id, its logprob (raw model distribution) and the top-N alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the smallest set whose probability mass reaches ``top_p``. logits: [V]."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= top_p      # mass before this token already reaches top_p
    drop[0] = False
    out = logits.clone()
    out[idx[drop]] = float("-inf")
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> Sampled:
    """Pick the next token of one sequence.

    Args:
        logits: [V] fp32 raw logits.
        params: the sequence's settings.
        generator: its RNG (seeded requests) or None.
    Returns:
        ``Sampled`` with the logprob under the raw (temperature 1) distribution, like vLLM's default.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if params.greedy:
        tok = int(torch.argmax(logits))
    else:
        scaled = top_p_filter(logits.float() / params.temperature, params.top_p)
        probs = torch.softmax(scaled, dim=-1)
        tok = int(torch.multinomial(probs, 1, generator=generator))
    top: list[tuple[int, float]] = []
    if params.logprobs:
        vals, ids = torch.topk(logp, min(params.logprobs, logp.shape[0]))
        top = list(zip(ids.tolist(), vals.tolist()))
    return Sampled(tok, float(logp[tok]), top)
