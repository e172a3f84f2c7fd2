"""Scenario files (``scenarios/<name>.yaml``) and the SLO file (``slo.yaml``): load, validate, sample requests."""
from __future__ import annotations

import pathlib
import random
from dataclasses import dataclass, field

import yaml

HERE = pathlib.Path(__file__).parent
ARRIVALS = ("concurrent", "poisson", "constant")
_WORDS = ("the expert router selects two experts per token and the cache keeps hot experts resident on the gpu "
          "while cold experts stream from pinned host memory in bit plane order").split()


@dataclass(frozen=True)
class Scenario:
    """A load scenario.

    Attributes:
        name: scenario name. endpoint: ``chat`` (/v1/chat/completions) or ``completions``.
        arrival: ``concurrent`` (N closed-loop users), ``poisson`` (open loop, ``rate`` req/s, optional
            ``burst_size`` requests per arrival), or ``constant`` (open loop, evenly spaced).
        prompt_words / max_tokens: (mean, stddev) of prompt length in words and requested output tokens.
        sweep_rates: if set, run each rate in turn (open loop) for an equal share of the duration.
    """

    name: str
    endpoint: str
    arrival: str
    concurrency: int = 1
    rate: float = 1.0
    burst_size: int = 1
    prompt_words: tuple[float, float] = (64, 0)
    max_tokens: tuple[float, float] = (64, 0)
    sweep_rates: tuple[float, ...] = field(default_factory=tuple)

    def sample(self, rng: random.Random) -> tuple[str, int]:
        """One request: (prompt text, max_tokens), lengths drawn from clipped normals."""
        n = max(1, int(rng.gauss(*self.prompt_words)))
        return " ".join(rng.choice(_WORDS) for _ in range(n)), max(1, int(rng.gauss(*self.max_tokens)))


def load_scenario(name_or_path: str) -> Scenario:
    """Load ``scenarios/<name>.yaml`` or a path; raises ValueError naming the file and field on bad input."""
    p = pathlib.Path(name_or_path)
    if not p.suffix:
        p = HERE / "scenarios" / f"{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(x.stem for x in (HERE / "scenarios").glob("*.yaml"))
        raise FileNotFoundError(f"scenario {name_or_path!r} not found ({p}); known: {known}")
    d = yaml.safe_load(p.read_text()) or {}
    where = f"{p}:"
    unknown = set(d) - {"name", "endpoint", "arrival", "prompt_words", "max_tokens", "sweep_rates"}
    if unknown:
        raise ValueError(f"{where} unknown fields {sorted(unknown)}")
    arr = d.get("arrival") or {}
    kind = arr.get("kind")
    if kind not in ARRIVALS:
        raise ValueError(f"{where} arrival.kind must be one of {ARRIVALS}, got {kind!r}")
    if d.get("endpoint") not in ("chat", "completions"):
        raise ValueError(f"{where} endpoint must be 'chat' or 'completions', got {d.get('endpoint')!r}")

    def dist(key):
        v = d.get(key) or {}
        if float(v.get("mean", 0)) < 1 or float(v.get("stddev", 0)) < 0:
            raise ValueError(f"{where} {key} needs mean >= 1 and stddev >= 0, got {v}")
        return float(v["mean"]), float(v.get("stddev", 0))

    rates = tuple(float(r) for r in d.get("sweep_rates") or ())
    if any(r <= 0 for r in rates) or float(arr.get("rate", 1)) <= 0 or int(arr.get("concurrency", 1)) < 1:
        raise ValueError(f"{where} rates and concurrency must be positive")
    return Scenario(name=d.get("name", p.stem), endpoint=d["endpoint"], arrival=kind,
                    concurrency=int(arr.get("concurrency", 1)), rate=float(arr.get("rate", 1.0)),
                    burst_size=int(arr.get("burst_size", 1)), prompt_words=dist("prompt_words"),
                    max_tokens=dist("max_tokens"), sweep_rates=rates)


def load_slo(path: str | pathlib.Path | None = None) -> dict:
    """The SLO dict (``request`` per-request bounds in seconds, ``aggregate`` run bounds)."""
    p = pathlib.Path(path) if path else HERE / "slo.yaml"
    d = yaml.safe_load(p.read_text()) or {}
    for sec in ("request", "aggregate"):
        if not isinstance(d.get(sec), dict):
            raise ValueError(f"{p}: missing section {sec!r}")
    return d
