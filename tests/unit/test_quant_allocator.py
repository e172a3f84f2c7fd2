"""MILP allocator: optimal (checked by brute force), within budget, reproducible, clear errors."""
from __future__ import annotations

import itertools

import pytest
import torch

from mxserve_kernels.formats import WeightScheme
from mxserve.quant.allocator import allocate, average_bits, uniform_scheme

CANDS = [WeightScheme(b, 128) for b in (2, 3, 4, 8)]


def problem(nb=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sens, numel = {}, {}
    for i in range(nb):
        key = (i // 2, i % 2, "gate_up" if i % 3 else "down")
        base = float(torch.rand(1, generator=g)) * 10 + 0.1
        sens[key] = {s.name: base * 4.0 ** (-s.bits) for s in CANDS}   # error falls ~6 dB per bit
        numel[key] = int(torch.randint(1, 4, (1,), generator=g)) * 1024
    return sens, numel


def brute_force(sens, numel, budget):
    blocks = sorted(sens)
    best, best_val = None, float("inf")
    for combo in itertools.product(CANDS, repeat=len(blocks)):
        plan = dict(zip(blocks, combo))
        if average_bits(plan, numel) <= budget + 1e-9:
            v = sum(sens[b][plan[b].name] for b in blocks)
            if v < best_val:
                best, best_val = plan, v
    return best, best_val


@pytest.mark.parametrize("budget", [2.25, 2.8, 3.25, 4.0])
def test_milp_matches_brute_force(budget):
    sens, numel = problem()
    plan = allocate(sens, numel, CANDS, budget)
    _, best_val = brute_force(sens, numel, budget)
    got = sum(sens[b][plan.schemes[b].name] for b in sens)
    assert plan.avg_bits <= budget + 1e-9
    assert got == pytest.approx(best_val, rel=1e-9)


def test_reproducible():
    sens, numel = problem(nb=40, seed=3)
    a = allocate(sens, numel, CANDS, 3.0)
    b = allocate(sens, numel, CANDS, 3.0)
    assert a.schemes == b.schemes


def test_time_term_moves_plan_toward_faster_schemes():
    sens, numel = problem(nb=12, seed=1)
    time = {b: {s.name: s.bits_per_weight * numel[b] for s in CANDS} for b in sens}  # fewer bits = faster
    acc = allocate(sens, numel, CANDS, 4.0)
    fast = allocate(sens, numel, CANDS, 4.0, time_us=time, r=0.9)
    assert fast.avg_bits < acc.avg_bits


def test_budget_below_cheapest_is_one_clear_error():
    sens, numel = problem()
    with pytest.raises(ValueError, match="below the cheapest scheme int2_g128_asym"):
        allocate(sens, numel, CANDS, 2.0)


def test_uniform_scheme_nearest_not_above():
    assert uniform_scheme(CANDS, 2.25).name == "int2_g128_asym"
    assert uniform_scheme(CANDS, 3.3).name == "int3_g128_asym"


def _layer_bits(plan, numel, layer):
    blocks = [b for b in numel if b[0] == layer]
    return sum(plan[b].bits_per_weight * numel[b] for b in blocks) / sum(numel[b] for b in blocks)


@pytest.mark.parametrize("budget", [2.8, 3.25])
def test_per_layer_budget_matches_brute_force(budget):
    sens, numel = problem(nb=6, seed=2)
    layers = sorted({b[0] for b in sens})
    plan = allocate(sens, numel, CANDS, budget, per_layer=True)
    blocks = sorted(sens)
    best_val = float("inf")
    for combo in itertools.product(CANDS, repeat=len(blocks)):
        p = dict(zip(blocks, combo))
        if all(_layer_bits(p, numel, l) <= budget + 1e-9 for l in layers):
            best_val = min(best_val, sum(sens[b][p[b].name] for b in blocks))
    assert all(_layer_bits(plan.schemes, numel, l) <= budget + 1e-9 for l in layers)
    assert sum(sens[b][plan.schemes[b].name] for b in blocks) == pytest.approx(best_val, rel=1e-9)


def test_layer_normalisation_divides_by_layer_energy():
    from mxserve.quant.api import normalise_sensitivity
    sens = {(0, 0, "down"): {"a": 4.0}, (1, 0, "down"): {"a": 4.0}}
    out = normalise_sensitivity(sens, {0: 2.0, 1: 8.0}, "layer")
    assert out[(0, 0, "down")]["a"] == 2.0 and out[(1, 0, "down")]["a"] == 0.5
    assert normalise_sensitivity(sens, {0: 2.0, 1: 8.0}, "none") is sens
    assert normalise_sensitivity(sens, {0: 2.0, 1: 8.0}, "sqrt")[(1, 0, "down")]["a"] == 2.0


def test_kld_normalisation_puts_layers_in_probe_kl_units():
    from mxserve.quant.api import normalise_sensitivity
    sens = {(0, 0, "down"): {"p": 1.0, "q": 3.0}, (0, 1, "down"): {"p": 3.0, "q": 1.0},
            (1, 0, "down"): {"p": 2.0, "q": 2.0}}
    out = normalise_sensitivity(sens, {}, "kld", {0: 0.8, 1: 0.1}, probe="p")
    assert sum(out[b]["p"] for b in out if b[0] == 0) == pytest.approx(0.8)
    assert out[(1, 0, "down")]["q"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="needs layer_kld"):
        normalise_sensitivity(sens, {}, "kld")
