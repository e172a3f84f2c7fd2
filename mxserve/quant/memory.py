"""Per-layer memory accounting of ``mxserve quantize``: the peak formula and a per-layer meter (time, CUDA peak).

The quantizer holds one decoder layer on the device at a time (``gptq/driver.py``), so device memory is bounded by
the largest per-layer peak, which ``layer_peak_bytes`` estimates from the geometry (docs/quantization.md, Memory).
``LayerMeter`` times each layer of each pass, reads ``torch.cuda.max_memory_allocated`` (reset per layer), writes a
one-line progress log and wraps the layer in a profiler range ``mxserve.quant.<phase>.layer<l>`` so a CPU profile
(``profile_memory=True``) can attribute allocations to layers (tests/unit/test_quant_memory.py does).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from mxserve.quant.gptq.solver import DEFAULT_BLOCK
from mxserve.quant.primitives import PACK_TEMP_BYTES, pack_temp_bytes

GIB = float(1 << 30)
FP32 = 4
# two_level_params (int1 2-means): 4 weight-sized fp32 temporaries alive at once (column weights, the weights
# either side of the threshold, their weighted product).
ONE_BIT_TEMPS = 4.0
# cuBLAS / cuSOLVER workspaces come out of PyTorch's caching allocator (counted by max_memory_allocated).
CUDA_WORKSPACE_BYTES = 64 << 20


def gptq_chunk_bytes(n: int, k: int, e_c: int, one_bit: bool = True, block: int = DEFAULT_BLOCK) -> int:
    """Peak transient bytes of one batched ``quantize_weight`` call on ``e_c`` experts of [N, K].

    w = e_c*N*K*4 (one fp32 weight copy), h = e_c*K*K*4 (one Hessian copy), codes = w/4, b = min(block, K)/K.
    Phases: group params (w + h + codes, int1 2-means + ONE_BIT_TEMPS*w), Cholesky (H, H^-1, its factor: 3h),
    column loop (working copy, codes, output; block copy, block errors, row update b*w each; lazy update of the
    remaining columns (1-b)*w; factor h), un-permute (output twice).
    Returns:
        max over the phases, in bytes.
    """
    w, h = e_c * n * k * FP32, e_c * k * k * FP32
    b = min(block, k) / k
    params = w + h + w / 4 + (ONE_BIT_TEMPS * w if one_bit else 0)
    chol = w + w / 4 + 3 * h
    loop = 2.25 * w + 2 * b * w + max(b * w, (1 - b) * w) + h
    unperm = 2.25 * w + w
    return int(max(params, chol, loop, unperm))


def layer_peak_bytes(geo: dict, tokens: int, *, compute_bytes: int, expert_chunk: int, other_params: int = 0,
                     one_bit: bool = True, pack_bits: int = 8) -> dict[str, int]:
    """Estimated device peak of one MoE decoder layer in each pass of ``quantize_checkpoint`` (GPTQ).

    Args:
        geo: {"experts": E, "hidden": H, "inter": I, "top_k": K} (``ckpt.geometry``).
        tokens: T calibration tokens. compute_bytes: c, bytes per element of the layer dtype: 2 (bf16, CUDA) or
            4 (fp32, CPU: ``.float()`` of a weight aliases it, and the packed outputs live on the device).
        expert_chunk: experts per batched GPTQ call. other_params: non-expert parameters of the layer
            (attention, router, norms). one_bit: an int1 candidate/scheme is in play. pack_bits: widest scheme
            packed in pass 2 (bounds the packing temporaries).
    Returns:
        {"sensitivity": bytes, "quantize": bytes, and the terms: "states", "weights", "fp32", "hessians",
        "gptq_gate_up", "gptq_down", "pack"} (plus CUDA_WORKSPACE_BYTES on the GPU).
    """
    e, hid, inter = geo["experts"], geo["hidden"], geo["inter"]
    c = compute_bytes
    e_c = min(expert_chunk, e)
    states = 3 * tokens * hid * c + tokens * geo.get("top_k", 8) * 12   # inputs, outputs, MoE inputs; routing
    weights = (3 * e * inter * hid + other_params) * c
    fp32 = 0 if c == FP32 else 3 * e * inter * hid * FP32   # fp32 gate_up/down references (pass 1)
    hess = e * (hid * hid + inter * inter) * FP32
    w_gu, w_dn = e * 2 * inter * hid * FP32, e * hid * inter * FP32   # dequantized candidates / outputs
    g_gu = gptq_chunk_bytes(2 * inter, hid, e_c, one_bit)
    g_dn = gptq_chunk_bytes(hid, inter, e_c, one_bit)
    base = states + weights + hess + (0 if c == FP32 else CUDA_WORKSPACE_BYTES)
    sens = base + fp32 + max(w_gu + g_gu, w_gu + w_dn + g_dn)
    # pass 2: fp32 copies to write back into (always copies); a scheme's experts gathered (fp32 weights and
    # Hessians; none when one scheme takes them all) and their dequantized output; one GPTQ chunk, then packing
    # (bounded temporaries; on CPU the packed outputs, <= 1.25 bytes per weight, are device memory too)
    pack = min(PACK_TEMP_BYTES, pack_temp_bytes(e_c * 2 * inter, hid, pack_bits))
    outputs = int(1.25 * 3 * e * inter * hid) if c == FP32 else 0
    gathered = w_gu + e * hid * hid * FP32 + w_gu
    quant = base + 3 * e * inter * hid * FP32 + gathered + g_gu + pack + outputs
    return {"sensitivity": int(sens), "quantize": int(quant), "states": states, "weights": weights, "fp32": fp32,
            "hessians": hess, "gptq_gate_up": g_gu, "gptq_down": g_dn, "pack": pack}


class LayerMeter:
    """Times each layer of each pass and records the device peak (CUDA only; None elsewhere).

    Args:
        device: the quantization device.
        n_layers: decoder layers (for the "layer l/N" log).
        log: called with one line per layer, e.g. ``"layer 3/48 sensitivity 9.8 s, peak 23.1 GiB"``; None = silent.
    """

    def __init__(self, device: torch.device, n_layers: int, log: Callable[[str], None] | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.n_layers = n_layers
        self.log = log
        self.layers: dict[str, list[dict]] = {}

    @contextmanager
    def layer(self, phase: str, l: int):
        """Measure layer ``l`` of ``phase`` ("sensitivity" | "quantize")."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"mxserve.quant.{phase}.layer{l}"):
            yield
        if self.cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        self.layers.setdefault(phase, []).append({"layer": l, "s": round(dt, 3), "peak_bytes": peak})
        if self.log is not None:
            mem = "" if peak is None else f", peak {peak / GIB:.1f} GiB"
            self.log(f"layer {l + 1}/{self.n_layers} {phase} {dt:.1f} s{mem}")

    def summary(self) -> dict:
        """{phase: {"s", "max_layer_s", "peak_gib" (max over layers, None off CUDA)}}."""
        out = {}
        for phase, rows in self.layers.items():
            peaks = [r["peak_bytes"] for r in rows if r["peak_bytes"] is not None]
            out[phase] = {"s": round(sum(r["s"] for r in rows), 2), "max_layer_s": max(r["s"] for r in rows),
                          "peak_gib": round(max(peaks) / GIB, 2) if peaks else None}
        return out
