"""Summary of an mxmoe checkpoint's bit plan: true average bits, histogram, per-layer table, heatmap."""
from __future__ import annotations

import pathlib

from mxserve.checkpoint.reader import HFCheckpoint


def plan_summary(path) -> dict:
    """{"avg_bits", "stored_bits", "histogram", "layers": [...], "grid": {"gate_up": [[bits]], "down": ...}}.

    ``avg_bits`` counts each block at its runtime scheme (nested: the chosen prefix); ``stored_bits`` counts the
    bytes actually on disk for expert tensors (nested: all planes).
    """
    ck = HFCheckpoint(path)
    if ck.quant is None:
        raise ValueError(f"{ck.path}: config.json has no mxmoe quantization_config")
    g = ck.geometry
    h, i = g["hidden"], g["inter"]
    hist: dict[str, int] = {}
    layers, grid_gu, grid_dn = [], [], []
    tot_bits = tot_w = stored = 0.0
    for prefix in sorted(ck.quant.experts, key=lambda p: int(p.split(".")[2])):
        plan = ck.quant.experts[prefix]
        lb = lw = 0.0
        for s in plan.gate_up:
            lb += s.bits_per_weight * 2 * h * i
            lw += 2 * h * i
            hist[s.name] = hist.get(s.name, 0) + 1
        for s in plan.down:
            lb += s.bits_per_weight * h * i
            lw += h * i
            hist[s.name] = hist.get(s.name, 0) + 1
        tot_bits += lb
        tot_w += lw
        layers.append({"module": prefix, "avg_bits": lb / lw,
                       "gate_up": _counts(plan.gate_up), "down": _counts(plan.down)})
        grid_gu.append([s.bits_per_weight for s in plan.gate_up])
        grid_dn.append([s.bits_per_weight for s in plan.down])
    for name in ck.names():
        if ".experts." in name:
            stored += _nbytes(ck, name) * 8
    return {"path": str(ck.path), "avg_bits": tot_bits / max(tot_w, 1), "stored_bits": stored / max(tot_w, 1),
            "histogram": dict(sorted(hist.items())), "layers": layers, "grid": {"gate_up": grid_gu, "down": grid_dn},
            "modules": {k: v.name for k, v in sorted(ck.quant.modules.items())}, "meta": ck.quant.meta}


def _counts(schemes) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in schemes:
        out[s.name] = out.get(s.name, 0) + 1
    return out


def _nbytes(ck: HFCheckpoint, name: str) -> int:
    from safetensors import safe_open
    with safe_open(str(ck.path / ck.weight_map[name]), "pt") as f:
        sl = f.get_slice(name)
        shape, dt = sl.get_shape(), sl.get_dtype()
    size = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4}.get(dt, 4)
    n = 1
    for d in shape:
        n *= d
    return n * size


def heatmap(summary: dict, png: str | pathlib.Path) -> pathlib.Path:
    """Layers x experts heatmap of chosen bits (gate_up and down panels) written as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4 + 0.12 * len(summary["grid"]["down"])), squeeze=False)
    vmin = min(min(r) for r in summary["grid"]["gate_up"] + summary["grid"]["down"])
    vmax = max(max(r) for r in summary["grid"]["gate_up"] + summary["grid"]["down"])
    for ax, blk in zip(axes[0], ("gate_up", "down")):
        im = ax.imshow(np.array(summary["grid"][blk]), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(f"{blk} bits (incl. metadata)")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist())
    fig.suptitle(f"{summary['path']}: {summary['avg_bits']:.3f} average bits")
    png = pathlib.Path(png)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
