"""Quantize a stack of weights (all experts of a layer sharing one scheme) with RTN, GPTQ or nested MWQ."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxserve_kernels.formats import WeightScheme
from mxserve.quant.gptq.solver import quantize_weight
from mxserve.quant.nested import quantize_nested
from mxserve.quant.primitives import GroupParams, pack, quantize_rtn


@dataclass(frozen=True)
class QuantOptions:
    """Algorithm knobs shared by every block of one quantization run."""

    method: str = "gptq"            # "gptq" | "rtn"
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = False
    expert_chunk: int = 32           # experts per batched GPTQ call (bounds device memory)

    def __post_init__(self) -> None:
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"--method must be 'gptq' or 'rtn', got {self.method!r}")


@torch.no_grad()
def quantize_stack(w: torch.Tensor, h: torch.Tensor | None, scheme: WeightScheme, opts: QuantOptions,
                   want_tensors: bool = True) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
    """Quantize E weights with one scheme.

    Args:
        w: [E, N, K] float weights. h: [E, K, K] Hessians (GPTQ) or None (RTN, or no calibration data).
        scheme: target scheme (nested: all planes are produced; ``scheme.bits`` selects the returned prefix).
        want_tensors: also return packed checkpoint tensors per expert (CPU).
    Returns:
        (dequantized float32 [E, N, K] at ``scheme``, [E] dicts of checkpoint tensors or None).
        No autograd graph is recorded (``w`` may be a layer's nn.Parameter). Device memory: the output plus one
        chunk's GPTQ temporaries (``mxserve.quant.memory.gptq_chunk_bytes``).
    """
    e, n, k = w.shape
    if scheme.bits == 16:
        return w.float(), ([{"weight": w[i].to(torch.bfloat16).cpu()} for i in range(e)] if want_tensors else None)
    if scheme.nested:
        deqs, tens = [], []
        for i in range(e):
            cw = None if h is None else torch.diagonal(h[i]).float()
            t, d = quantize_nested(w[i], scheme, cw)
            deqs.append(d[scheme.bits])
            tens.append(t)
        return torch.stack(deqs), (tens if want_tensors else None)
    deq, tens = None, []
    for c0 in range(0, e, opts.expert_chunk):
        wc = w[c0:c0 + opts.expert_chunk]
        if opts.method == "gptq" and h is not None:
            codes, params, dq = quantize_weight(wc, h[c0:c0 + opts.expert_chunk], scheme, damp=opts.damp,
                                                act_order=opts.act_order, static_groups=True,
                                                clip_search=opts.clip_search)
        else:
            codes, params, dq = quantize_rtn(wc, scheme, clip_search=opts.clip_search)
        if c0 == 0 and dq.shape[0] == e:
            deq = dq.float()           # one chunk: no copy
        else:
            if deq is None:
                deq = torch.empty((e, n, k), dtype=torch.float32, device=dq.device)
            deq[c0:c0 + dq.shape[0]] = dq
        del dq
        if want_tensors:
            ec = wc.shape[0]
            flat = pack(scheme, codes.reshape(ec * n, k),
                        GroupParams(params.scales.reshape(ec * n, -1),
                                    None if params.zeros is None else params.zeros.reshape(ec * n, -1)))
            tens += [{name: t.view(ec, n, -1)[i].clone() for name, t in flat.items()} for i in range(ec)]
    return deq, (tens if want_tensors else None)


def split_rows(tensors: dict[str, torch.Tensor], n_first: int) -> tuple[dict, dict]:
    """Split the canonical tensors of a row-stacked [N1+N2, K] weight into its two parts (gate / up)."""
    a = {k: v[:n_first].clone() for k, v in tensors.items()}
    b = {k: v[n_first:].clone() for k, v in tensors.items()}
    return a, b
