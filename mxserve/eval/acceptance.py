"""Issue-3 acceptance measurement: mixed plan vs uniform GPTQ at the same true bits on the demo model.

    python -m mxserve.eval.acceptance --demo DIR [--bits 2.25 3.25] [--json OUT] [--device cpu]

DIR is ``mxserve demo-model --out DIR`` (checkpoint + calib.txt + eval.txt). Writes one JSON object with, per
budget, the true average bits and {ppl, kld, top1} of the uniform checkpoint (the issue's baseline: int2_g128_asym
at 2.25, int3_g128_asym at 3.25, GPTQ) and of the mixed plan for each ``--variants`` entry (default: layer, none,
sqrt, mxmoe, kld, insample; also perlayer), and their KLD ratios; prints one ``RATIO`` line per ratio.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile
import time

from mxserve.eval.compare import compare
from mxserve.quant.api import quantize_checkpoint


def _quantize_and_compare(demo_p: pathlib.Path, dst: pathlib.Path, b: float, device, method, samples, seq_len,
                          **kw) -> dict:
    t = time.time()
    s = quantize_checkpoint(demo_p, dst, bits=b, calib=str(demo_p / "calib.txt"), method=method, device=device,
                            progress=False, n_samples=samples, seq_len=seq_len, **kw)
    r = compare(demo_p, dst, demo_p / "eval.txt", device=device)
    shutil.rmtree(dst, ignore_errors=True)
    return dict(r, avg_bits=s["avg_bits"], histogram=s["histogram"], seconds=round(time.time() - t, 1))


# mixed-plan variants: name -> quantize_checkpoint kwargs
VARIANTS = {"layer": dict(sens_norm="layer"),                            # cross-layer, layer-normalised (default)
            "none": dict(sens_norm="none"),                              # cross-layer, raw squared norms
            "perlayer": dict(sens_norm="none", per_layer_budget=True),  # per-layer budget, squared norms
            "sqrt": dict(sens_norm="sqrt"),                              # cross-layer, plain norms
            "mxmoe": dict(sens_norm="sqrt", per_layer_budget=True),     # MxMoE: plain norms, per-layer solve
            "kld": dict(sens_norm="kld"),                                # layers weighted by output-KL probe
            "insample": dict(sens_norm="layer", sens_holdout=False)}     # "layer" scored on its GPTQ fit tokens


def measure(demo: str, bits: list[float], device: str | None, method: str = "gptq", samples: int = 128,
            seq_len: int = 256, variants: tuple[str, ...] = ("layer", "none", "sqrt", "mxmoe", "kld", "insample"),
            candidates: list[str] | None = None) -> dict:
    """Quantize ``demo`` uniformly and mixed at each budget and compare both with the bf16 model.

    Args:
        variants: mixed-plan variants (keys of ``VARIANTS``); the first is the headline ("mixed"), the others
            are reported as "mixed_<variant>" with their own ratios. Pass 1 (sensitivity) runs once and is
            shared by all budgets and variants.
    Returns:
        {"demo", "method", "variants", "seconds", "budgets": {bits: {"uniform": {...}, "mixed": {...},
        "mixed_<norm>": {...}, "kld_ratio_mixed_over_uniform": float, "kld_ratio_mixed_<norm>_over_uniform": ...}}}.
    """
    demo_p = pathlib.Path(demo)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    out: dict = {"demo": str(demo_p), "method": method, "variants": list(variants), "budgets": {}}
    cache: dict = {}
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for b in bits:
            row = {"uniform": _quantize_and_compare(demo_p, pathlib.Path(tmp) / f"uniform-{b}", b, device, method,
                                                    samples, seq_len, uniform=True, candidates=candidates)}
            for i, var in enumerate(variants):
                key = "mixed" if i == 0 else f"mixed_{var}"
                row[key] = _quantize_and_compare(demo_p, pathlib.Path(tmp) / f"{key}-{b}", b, device, method,
                                                 samples, seq_len, candidates=candidates, sens_cache=cache,
                                                 **VARIANTS[var])
                row[key]["variant"] = var
                row[f"kld_ratio_{key}_over_uniform"] = row[key]["kld"] / max(row["uniform"]["kld"], 1e-30)
                print(f"bits {b} [{key}, variant {var}]: KLD mixed/uniform = "
                      f"{row[f'kld_ratio_{key}_over_uniform']:.3f} ({row[key]['kld']:.4g} vs "
                      f"{row['uniform']['kld']:.4g}; top-1 {row[key]['top1']:.3f} vs {row['uniform']['top1']:.3f}; "
                      f"{row[key]['histogram']})", flush=True)
            out["budgets"][str(b)] = row
    out["seconds"] = round(time.time() - t_all, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.25, 3.25])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--device")
    ap.add_argument("--variants", choices=sorted(VARIANTS), nargs="+",
                    default=["layer", "none", "sqrt", "mxmoe", "kld", "insample"],
                    help="mixed-plan variants (layer: cross-layer with layer-normalised sensitivity; none: raw; sqrt: plain "
                         "norms; "
                         "perlayer: per-layer budget; mxmoe: per-layer budget with plain norms; kld: layers "
                         "weighted by an output-KL probe; insample: layer without hold-out scoring); the first is "
                         "the headline 'mixed' row")
    ap.add_argument("--candidates", help="comma list of scheme names (default: quantize's default candidates)")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args(argv)
    res = measure(a.demo, a.bits, a.device, a.method, variants=tuple(a.variants),
                  candidates=a.candidates.split(",") if a.candidates else None)
    txt = json.dumps(res, indent=1)
    print(txt)
    for b, row in res["budgets"].items():
        for k, v in row.items():
            if k.startswith("kld_ratio_"):
                print(f"RATIO bits={b} {k}={v:.4f}")
    print(f"total {res['seconds']} s")
    if a.json:
        pathlib.Path(a.json).write_text(txt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
