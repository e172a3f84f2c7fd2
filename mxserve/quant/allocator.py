"""Exact mixed-precision allocation as a MILP (``scipy.optimize.milp``, HiGHS): one scheme per expert block.

Variables ``x[b, s]`` in {0, 1} for block b (a (layer, expert, "gate_up"|"down") triple: gate and up are one tied
block) and candidate scheme s. Minimise ``(1 - r) * sum x*D / D0 + r * sum x*T / T0`` where D is the block's
sensitivity (``sensitivity.block_errors``) and T its kernel time (``mxserve_kernels.moe.cost``) at the serving
batch, both normalised by their mean-scheme totals; subject to ``sum_s x[b, s] = 1`` and the average-bits budget
``sum x * bits_s * numel_b <= budget * sum numel_b`` where bits include scales/zeros (``bits_per_weight``). HiGHS is
deterministic, so the same inputs give the same plan; ``mip_rel_gap=0`` asks for a proven optimum (the achieved gap
is reported).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mxserve_kernels.formats import WeightScheme

BlockKey = tuple[int, int, str]   # (layer, expert, "gate_up" | "down")
DEFAULT_TIME_LIMIT_S = 120.0


@dataclass(frozen=True)
class BitPlan:
    """Chosen scheme per block plus solver provenance."""

    schemes: dict[BlockKey, WeightScheme]
    avg_bits: float
    objective: float
    status: str
    mip_gap: float

    def layer_schemes(self, layer: int, num_experts: int) -> tuple[list[WeightScheme], list[WeightScheme]]:
        """(gate_up schemes [E], down schemes [E]) of one layer."""
        return ([self.schemes[(layer, e, "gate_up")] for e in range(num_experts)],
                [self.schemes[(layer, e, "down")] for e in range(num_experts)])


def average_bits(schemes: dict[BlockKey, WeightScheme], numel: dict[BlockKey, int]) -> float:
    """Storage-weighted mean bits per weight (metadata included) of a plan."""
    tot = sum(numel.values())
    return sum(schemes[b].bits_per_weight * numel[b] for b in schemes) / tot


def uniform_scheme(candidates: list[WeightScheme], budget: float) -> WeightScheme:
    """The candidate whose bits (with metadata) are nearest the budget without exceeding it."""
    ok = [s for s in candidates if s.bits_per_weight <= budget + 1e-9]
    if not ok:
        raise ValueError(f"--bits {budget}: below the cheapest scheme "
                         f"{min(candidates, key=lambda s: s.bits_per_weight).name} "
                         f"({min(s.bits_per_weight for s in candidates):.4g} bits incl. metadata)")
    return max(ok, key=lambda s: s.bits_per_weight)


def allocate(sensitivity: dict[BlockKey, dict[str, float]], numel: dict[BlockKey, int],
             candidates: list[WeightScheme], budget: float, *, time_us: dict[BlockKey, dict[str, float]] | None = None,
             r: float = 0.0, time_limit_s: float = DEFAULT_TIME_LIMIT_S, per_layer: bool = False) -> BitPlan:
    """Solve the allocation MILP.

    Args:
        sensitivity: {block: {scheme name: error}} for every block and candidate.
        numel: {block: number of weights} (gate_up counts gate + up).
        candidates: schemes to choose from.
        budget: average bits per weight over all blocks, metadata included.
        time_us: {block: {scheme name: kernel microseconds}} (needed when r > 0).
        r: weight of the time term in [0, 1] (0 = accuracy only, MxMoE's weight-only setting).
        per_layer: the budget holds in every layer separately (MxMoE ``--solve_mode layer``) instead of only on
            the model average (cross-layer allocation, the default).
    Returns:
        BitPlan. Raises ValueError if the budget is below the cheapest scheme or inputs are incomplete.
    """
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if not 0.0 <= r <= 1.0:
        raise ValueError(f"allocate: r={r} must be in [0, 1]")
    uniform_scheme(candidates, budget)  # budget sanity (raises naming the cheapest scheme)
    blocks = sorted(sensitivity)
    names = [s.name for s in candidates]
    nb, ns = len(blocks), len(candidates)
    for b in blocks:
        missing = [n for n in names if n not in sensitivity[b]]
        if missing or b not in numel:
            raise ValueError(f"allocate: block {b} lacks sensitivity for {missing or 'its size'}")
    d = np.array([[sensitivity[b][n] for n in names] for b in blocks], dtype=np.float64)
    c = (1.0 - r) * d / max(d.mean(1).sum(), 1e-300)
    if r > 0:
        if time_us is None:
            raise ValueError("allocate: r > 0 needs time_us")
        t = np.array([[time_us[b][n] for n in names] for b in blocks], dtype=np.float64)
        c = c + r * t / max(t.mean(1).sum(), 1e-300)
    sizes = np.array([numel[b] for b in blocks], dtype=np.float64)
    bits = np.array([s.bits_per_weight for s in candidates])
    rows = np.repeat(np.arange(nb), ns)
    cols = np.arange(nb * ns)
    one_hot = coo_matrix((np.ones(nb * ns), (rows, cols)), shape=(nb, nb * ns))
    scale = sizes.sum()
    mem = (np.outer(sizes, bits) / scale).reshape(1, -1)
    cons = [LinearConstraint(one_hot, 1, 1), LinearConstraint(mem, -np.inf, budget + 1e-12)]
    if per_layer:
        layers = sorted({b[0] for b in blocks})
        li = {l: i for i, l in enumerate(layers)}
        lrow = np.array([li[b[0]] for b in blocks])
        lsum = np.bincount(lrow, weights=sizes)
        vals = (np.outer(sizes / lsum[lrow], bits)).reshape(-1)
        per = coo_matrix((vals, (np.repeat(lrow, ns), cols)), shape=(len(layers), nb * ns))
        cons.append(LinearConstraint(per, -np.inf, budget + 1e-12))
    res = milp(c.reshape(-1), constraints=cons, integrality=np.ones(nb * ns), bounds=(0, 1),
               options={"mip_rel_gap": 0.0, "time_limit": time_limit_s, "disp": False})
    if res.x is None:
        raise ValueError(f"allocate: MILP found no feasible plan ({res.message})")
    choice = res.x.reshape(nb, ns).argmax(1)
    schemes = {b: candidates[int(j)] for b, j in zip(blocks, choice)}
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    return BitPlan(schemes=schemes, avg_bits=average_bits(schemes, numel), objective=float(res.fun),
                   status=str(res.message), mip_gap=gap)
