"""Expert-offload arithmetic and reporting of ``mxserve bench e2e`` (issue 7, docs/offload.md "End to end").

The offload variants, where their expert bytes live (the vLLM peers keep on the GPU exactly the bytes of mxmoe's
slot pool at the same share), vLLM's ``--cpu-offload-gb`` keyword arguments, the pinned H2D copy bandwidth measured
before the engines start, and the markdown table of the offload rows. No vLLM import (the plugin layer runs the
engines); ``mxserve.cli.bench`` re-exports these names.
"""
from __future__ import annotations

import re
import subprocess
import sys

OFFLOAD_BUDGETS = {"mxmoe_w4_off100": 1.0, "mxmoe_w4_off50": 0.5, "mxmoe_w4_off25": 0.25}  # GPU share of experts
VLLM_OFFLOAD = {"gptq_w4_cpuoff25": ("gptq_w4", 0.25), "bf16_cpuoff25": ("bf16", 0.25)}  # (peer, GPU share)
NESTED_W4 = "int2_g128_asym_nested4"   # offloaded experts must be nested (int2 base + planes 3, 4): 4.5 bits


def offload_section(fraction: float) -> dict:
    """``quantization_config["offload"]`` of the offload variants: GPU slot pool = ``fraction`` of all expert planes,
    HEBF prefetch/eviction with one layer of look-ahead, a late upper plane runs the expert at its int2 base."""
    return {"version": 1, "gpu_budget_fraction": fraction, "policy": "hebf", "lookahead": 1, "on_miss": "base",
            "max_stall_us": 0.0}


# ---- expert memory arithmetic (same GPU memory for the offload peers) ------------------------------------------
GIB = 1 << 30


def geometry(config: dict) -> dict:
    """Routed-expert geometry of an HF config.json dict: {layers (MoE layers), experts, hidden, inter}.

    Raises:
        ValueError: naming the field when the config has no experts or dense layers between MoE layers (the arithmetic
            below assumes every decoder layer is a MoE layer).
    """
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not experts:
        raise ValueError("config.json: no num_experts / num_local_experts (not a MoE model)")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError("config.json: mlp_only_layers / decoder_sparse_step != 1 (dense layers) not supported")
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    return {"layers": int(config["num_hidden_layers"]), "experts": int(experts), "hidden": int(config["hidden_size"]),
            "inter": int(inter)}


def expert_bytes(geo: dict, fmt: str) -> int:
    """Bytes of all routed-expert weights (gate_up ``[2I, H]`` + down ``[H, I]`` per expert and layer) in ``fmt``.

    Args:
        geo: ``geometry`` dict.
        fmt: "bf16" (vLLM ``w13_weight`` / ``w2_weight``); "gptq_w4" (vLLM GPTQ-Marlin MoE parameters as created,
            which ``--cpu-offload-gb`` counts: int32 qweight K*N/2, bf16 scales and packed qzeros per g128 group,
            int32 g_idx + sort indices per input row); or an mxserve ``WeightScheme`` name (exact storage bytes).
    Returns:
        layers x E x bytes per expert.
    """
    H, I = geo["hidden"], geo["inter"]
    per = 0
    for n, k in ((2 * I, H), (H, I)):      # gate_up: N=2I, K=H; down: N=H, K=I
        if fmt == "bf16":
            per += 2 * n * k
        elif fmt == "gptq_w4":
            g = 128
            per += n * k // 2 + 2 * (k // g) * n + 2 * (k // g) * (n // 8) + 2 * 4 * k
        else:
            from mxserve_kernels.formats import WeightScheme
            per += WeightScheme.parse(fmt).storage_bytes(n, k)
    return geo["layers"] * geo["experts"] * per


def offload_pool_bytes(geo: dict, fraction: float) -> tuple[int, int]:
    """(GPU slot-pool bytes, host arena bytes) of mxmoe offload at ``fraction`` with ``NESTED_W4`` experts, as
    ``ExpertCache`` sizes them (``PlaneLayout`` with 128-byte aligned tensors, ``num_slots``)."""
    from mxserve.scheduler.config import OffloadConfig
    from mxserve.scheduler.layout import PlaneLayout
    from mxserve.scheduler.simulator import num_slots
    from mxserve_kernels.formats import WeightScheme
    s = WeightScheme.parse(NESTED_W4)
    layout = PlaneLayout(hidden=geo["hidden"], inter=geo["inter"], gate_up=s, down=s)
    cfg = OffloadConfig.from_dict(offload_section(fraction))
    return (num_slots(cfg, layout, geo["layers"], geo["experts"]) * layout.slot_bytes,
            layout.expert_bytes * geo["layers"] * geo["experts"])


def expert_memory(geo: dict, variant: str) -> dict:
    """Where a variant's routed-expert bytes live: {total_gib, gpu_gib, host_gib} and, for a vLLM offload peer,
    ``cpu_offload_gb`` (GiB, vLLM's unit). A peer keeps on the GPU the bytes of mxmoe's slot pool at the same share
    (``offload_pool_bytes``): the same GPU memory for expert weights, not the same fraction of its own bytes (the
    4.5-bit nested pool is larger than 25% of GPTQ's 4.2-bit experts, so the peer gets the larger resident share)."""
    if variant in OFFLOAD_BUDGETS:
        gpu, host = offload_pool_bytes(geo, OFFLOAD_BUDGETS[variant])
        return {"total_gib": host / GIB, "gpu_gib": gpu / GIB, "host_gib": host / GIB}
    if variant in VLLM_OFFLOAD:
        peer, frac = VLLM_OFFLOAD[variant]
        total = expert_bytes(geo, peer)
        gpu = min(total, offload_pool_bytes(geo, frac)[0])
        return {"total_gib": total / GIB, "gpu_gib": gpu / GIB, "host_gib": (total - gpu) / GIB,
                "cpu_offload_gb": round((total - gpu) / GIB, 3)}
    if variant not in ("bf16", "gptq_w4", "mxmoe_w4"):
        return {}          # fp8 (online) / the mixed plan: not part of the offload comparison
    total = expert_bytes(geo, {"mxmoe_w4": "int4_g128_asym"}.get(variant, variant))
    return {"total_gib": total / GIB, "gpu_gib": total / GIB, "host_gib": 0.0}


def vllm_offload_kwargs(geo: dict, variant: str) -> dict:
    """``vllm.LLM`` keyword arguments of a vLLM offload peer: UVA ``cpu_offload_gb`` (``expert_memory``) limited
    to the experts' parameters (``cpu_offload_params``: the name segment "experts"); {} for other variants."""
    if variant not in VLLM_OFFLOAD:
        return {}
    return {"cpu_offload_gb": expert_memory(geo, variant)["cpu_offload_gb"], "cpu_offload_params": ["experts"]}


def offload_rows(results: list[dict], batch_sizes: list[int], pinned_gbps: float | None) -> str:
    """Markdown table of the offload variants (those with ``expert_memory`` host bytes or cache counters): expert
    GiB on GPU / host, per batch size stall fraction, average H2D GB/s (and x the pinned copy bandwidth) and hit
    rate, and the TTFT-prompt prefill tok/s; "" if there is none."""
    rows = []
    for r in results:
        em = r.get("expert_memory") or {}
        if "throughput" not in r or not (em.get("host_gib") or r.get("offload")):
            continue
        cells = [r["variant"], f"{em['gpu_gib']:.2f} / {em['host_gib']:.2f}" if em else "-"]
        for b in batch_sizes:
            o = (r.get("offload") or {}).get(b)
            if not o:
                cells.append("-")
                continue
            x = f" ({o['h2d_gbps'] / pinned_gbps:.2f}x)" if pinned_gbps else ""
            hit = "-" if o.get("hit_rate") is None else f"{o['hit_rate']:.2f}"
            cells.append(f"{100 * o['stall_fraction']:.0f}% / {o['h2d_gbps']:.1f}{x} / {hit}")
        cells.append(f"{r['prefill_tok_s']:,.0f}" if r.get("prefill_tok_s") else "-")
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = ("| variant | experts GPU / host GiB | " + " | ".join(f"B={b} stall / H2D GB/s / hit" for b in batch_sizes)
            + " | prefill tok/s (TTFT prompt) |\n|" + "---|" * (len(batch_sizes) + 3))
    pin = f"pinned H2D copy: {pinned_gbps:.1f} GB/s" if pinned_gbps else "pinned H2D copy: not measured"
    return f"\n{pin}\n\n{head}\n" + "\n".join(rows) + "\n"


def measure_pinned_gbps(gib: float, timeout: float = 180.0) -> dict:
    """Pinned host -> GPU copy bandwidth of one ``gib`` GiB buffer (``mxserve.scheduler.bench.pinned_bandwidth``,
    best of 5), in a subprocess so this process never holds a CUDA context while the engines run.

    Returns:
        {"pinned_gbps": GB/s, "pinned_gib": gib} or {"pinned_error": message}.
    """
    code = ("import json; from mxserve.scheduler.bench import pinned_bandwidth; "
            f"print('PINNED', json.dumps(pinned_bandwidth(int({gib} * (1 << 30)))))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"pinned_error": f"timeout after {timeout:.0f}s"}
    m = re.search(r"^PINNED ([\d.eE+-]+)$", p.stdout, re.MULTILINE)
    if p.returncode != 0 or not m:
        return {"pinned_error": f"rc={p.returncode}: " + (p.stderr or p.stdout)[-1000:]}
    return {"pinned_gbps": float(m.group(1)), "pinned_gib": gib}
