"""GPTQ (Frantar et al. 2023) as pure functions, batched over a leading expert dim: no hooks, I/O or devices.

``quantize_weight(W [E, N, K], H [E, K, K], scheme)`` quantizes E independent weights at once (all experts of a
layer), so the per-column Python loop is paid once per layer instead of once per expert. Computation runs in
``GPTQ_PRECISION``. Defaults follow MxMoE: damping 1% of mean(diag H), act-order with static groups, block 128.
Act-order without static groups is refused: the canonical format has no g_idx, so groups must stay contiguous.
Dead input columns (diag H == 0) get a unit diagonal; an all-zero H (an expert no calibration token reached)
therefore degrades exactly to RTN.
"""
from __future__ import annotations

from typing import Callable

import torch

from mxserve_kernels.formats import WeightScheme
from mxserve.quant.primitives import GroupParams, group_params, quantize_codes, search_clip

GPTQ_PRECISION = torch.float32
DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


def make_empty_hessian(k: int, e: int | None = None, device=None) -> torch.Tensor:
    """Zero Hessian accumulator: [K, K] or [E, K, K] in GPTQ_PRECISION."""
    shape = (k, k) if e is None else (e, k, k)
    return torch.zeros(shape, dtype=GPTQ_PRECISION, device=device)


def accumulate_hessian(h: torch.Tensor, n_seen: int, x: torch.Tensor) -> int:
    """In-place running mean ``H = (2/n) sum x x^T`` over all rows seen so far.

    Args:
        h: [K, K] accumulator (from ``make_empty_hessian``).
        n_seen: rows accumulated so far.
        x: [T, K] new input rows (any float dtype).
    Returns:
        the new row count ``n_seen + T``.
    """
    t = x.shape[0]
    if t == 0:
        return n_seen
    xf = x.reshape(-1, x.shape[-1]).to(GPTQ_PRECISION)
    n = n_seen + t
    h.mul_(n_seen / n).addmm_(xf.t(), xf, alpha=2.0 / n)
    return n


def _prepare(w: torch.Tensor, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Damp; dead columns get diag 1 (their weights are kept, unlike the reference which zeroes them: an expert
    that calibration never reached still serves tokens later). Returns (W, H) copies in GPTQ_PRECISION."""
    w = w.to(GPTQ_PRECISION).clone()
    h = h.to(GPTQ_PRECISION).clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    diag.add_(damp * diag.mean(-1, keepdim=True))
    return w, h


def _upper_inverse_chol(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 ([E, K, K]); raises ValueError if H is not positive definite."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info.max()) != 0:
        raise ValueError("GPTQ: Hessian is not positive definite even after damping (increase damp)")
    hinv = torch.cholesky_inverse(lower)
    del lower                                                  # peak 3 Hessian-sized buffers, not 4
    return torch.linalg.cholesky(hinv, upper=True)


ColumnQuantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def gptq_loop(w: torch.Tensor, hinv: torch.Tensor, quant_col: ColumnQuantizer,
              on_group_start: Callable[[int, torch.Tensor], None] | None = None, group_size: int = 128,
              block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """The GPTQ column sweep with lazy block updates (in place on ``w``, already permuted).

    Args:
        w: [E, N, K] weight (permuted column order).
        hinv: [E, K, K] upper Cholesky factor of H^-1 (same order).
        quant_col: (column [E, N], position i) -> dequantized column [E, N]; records codes itself.
        on_group_start: called with (i, W[..., i:i+G]) at each group start (dynamic groups), or None.
    Returns:
        [E, N, K] dequantized weight (permuted order).
    """
    e, n, k = w.shape
    out = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if on_group_start is not None and col % group_size == 0:
                on_group_start(col, torch.cat([w1[..., i:], w[..., i2:]], -1)[..., :group_size])
            wc = w1[..., i]
            d = h1[:, i, i].unsqueeze(-1)                      # [E, 1]
            q = quant_col(wc, torch.tensor(col))
            out[..., col] = q
            err = (wc - q) / d
            w1[..., i:] -= err.unsqueeze(-1) * h1[:, i, i:].unsqueeze(1)
            err1[..., i] = err
        w[..., i2:] -= torch.bmm(err1, hinv[:, i1:i2, i2:])
    return out


@torch.no_grad()
def quantize_weight(w: torch.Tensor, h: torch.Tensor, scheme: WeightScheme, *, damp: float = DEFAULT_DAMP,
                    act_order: bool = True, static_groups: bool = True, clip_search: bool = False,
                    block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, GroupParams, torch.Tensor]:
    """GPTQ-quantize E weights at once.

    Args:
        w: [E, N, K] (or [N, K]) float weights.
        h: [E, K, K] (or [K, K]) Hessians ``2/n sum x x^T`` of each weight's inputs.
        scheme: integer, non-nested WeightScheme (bits 1/2/3/4/8; 1-bit levels from diag-H weighted 2-means).
        damp: fraction of mean(diag H) added to the diagonal.
        act_order: process columns by descending diag(H) (requires static_groups).
        static_groups: group parameters from the original W before any update.
        clip_search: per-group clip ratio search weighted by diag(H) (static groups only).
    Returns:
        (codes uint8 [E, N, K], GroupParams with [E, N, K/G] tensors, dequantized GPTQ_PRECISION [E, N, K]),
        all in original column order, batch dim dropped again if the input was 2-D.
        Runs without autograd: a ``w`` that requires grad (an nn.Parameter) must not record the column sweep,
        whose in-place updates of saved tensors form reference cycles that are never freed (issue 3).
    """
    if scheme.bits == 16 or scheme.nested:
        raise ValueError(f"GPTQ quantize_weight: scheme {scheme.name} is not a plain integer scheme")
    if act_order and not static_groups:
        raise ValueError("GPTQ: act_order needs static_groups (the canonical format has no g_idx)")
    squeeze = w.dim() == 2
    if squeeze:
        w, h = w.unsqueeze(0), h.unsqueeze(0)
    e, n, k = w.shape
    if h.shape != (e, k, k):
        raise ValueError(f"GPTQ: Hessian shape {list(h.shape)} does not match weight {list(w.shape)}")
    scheme.check_shape(n, k, "GPTQ weight")
    g = scheme.group_size
    w, h = _prepare(w, h, damp)
    codes = torch.zeros((e, n, k), dtype=torch.uint8, device=w.device)
    ng = k // g
    ar = torch.arange(e, device=w.device)
    if static_groups:
        dh = torch.diagonal(h, dim1=-2, dim2=-1).clone()   # [E, K] copy: a view would pin the [E, K, K] H
        clip = search_clip(w, scheme, dh) if clip_search else 1.0
        params = group_params(w, scheme, clip, dh)   # diag-H weighted 2-means levels at 1 bit
    else:
        params = GroupParams(torch.zeros(e, n, ng, device=w.device),
                             None if scheme.symmetric else torch.zeros(e, n, ng, device=w.device))
    if act_order:
        perm = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # [E, K]
        w = torch.gather(w, -1, perm.unsqueeze(1).expand(e, n, k))
        h = h[ar[:, None, None], perm[:, :, None], perm[:, None, :]]
    else:
        perm = torch.arange(k, device=w.device).expand(e, k)
    hinv = _upper_inverse_chol(h)
    del h                                                      # only H^-1's factor is needed from here

    def quant_col(wc: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        orig = perm[:, int(col)]                                # [E]
        grp = (orig // g)[:, None, None].expand(e, n, 1)
        s = torch.gather(params.scales, -1, grp).squeeze(-1)
        z = None if params.zeros is None else torch.gather(params.zeros, -1, grp).squeeze(-1)
        c, dq = quantize_codes(wc, s, z, scheme)
        codes[ar, :, orig] = c
        return dq

    def group_start(col: int, wg: torch.Tensor) -> None:
        p = group_params(wg, scheme)                          # wg: [E, N, G] -> one group
        params.scales[..., col // g] = p.scales[..., 0]
        if params.zeros is not None:
            params.zeros[..., col // g] = p.zeros[..., 0]

    dq = gptq_loop(w, hinv, quant_col, None if static_groups else group_start, g, block)
    del w, hinv
    inv = torch.argsort(perm, dim=-1)
    dq = torch.gather(dq, -1, inv.unsqueeze(1).expand(e, n, k))
    if squeeze:
        return codes[0], GroupParams(params.scales[0], None if params.zeros is None else params.zeros[0]), dq[0]
    return codes, params, dq
