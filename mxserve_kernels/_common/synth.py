"""Synthetic canonical weights (random codes, scales and zeros) for tests, tuning and benchmarks."""
from __future__ import annotations

import torch

from mxserve_kernels.formats import NESTED_BASE_BITS, WeightScheme

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def random_canonical(scheme: WeightScheme, n: int, k: int, *, device="cpu", generator: torch.Generator | None = None,
                     std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random canonical tensors of an [N, K] weight whose dequantized values have roughly ``std`` spread.

    Args:
        scheme: target scheme. n, k: weight shape. generator: torch RNG (CPU) for reproducibility.
    Returns:
        dict of canonical tensors named by ``formats.tensor_names(scheme)`` (nested: all planes 3..4).
    """
    from mxserve_kernels.quant.reference import pack_codes

    gdev = generator.device if generator is not None else torch.device(device)

    def rnd(*shape):
        return torch.randn(*shape, generator=generator, device=gdev)

    if scheme.bits == 16:
        return {"weight": (rnd(n, k) * std).to(device=device, dtype=torch.bfloat16)}
    scheme.check_shape(n, k)
    g, sd = scheme.group_size, _DT[scheme.scale_dtype]
    qb = NESTED_BASE_BITS if scheme.nested else scheme.bits
    lo = 1 if scheme.symmetric else 0
    codes = torch.randint(lo, 1 << qb, (n, k), generator=generator, device=gdev)
    scale = (rnd(n, k // g).abs() + 0.5) * (std * 4 / (1 << qb))
    out = {"qweight": pack_codes(codes, qb), "scales": scale.to(sd)}
    if not scheme.symmetric:
        out["zeros"] = (-(scale * ((1 << qb) - 1) / 2) + rnd(n, k // g) * std * 0.1).to(sd)
    if scheme.nested:
        for p in range(NESTED_BASE_BITS + 1, 5):
            out[f"plane{p}_weight"] = pack_codes(torch.randint(0, 2, (n, k), generator=generator, device=gdev), 1)
            out[f"plane{p}_scales"] = (scale / (1 << (p - 1))).to(sd)
    return {name: t.to(device) for name, t in out.items()}
