"""Issue-3 acceptance measurement: mixed plan vs uniform GPTQ at the same true bits on the demo model.

    python -m mxserve.eval.acceptance --demo DIR [--bits 2.25 3.25] [--json OUT] [--device cpu]

DIR is ``mxserve demo-model --out DIR`` (checkpoint + calib.txt + eval.txt). Writes one JSON object with, per
budget, the true average bits and {ppl, kld, top1} of the mixed and the uniform checkpoint, and their KLD ratio.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

from mxserve.eval.compare import compare
from mxserve.quant.api import quantize_checkpoint


def measure(demo: str, bits: list[float], device: str | None, method: str = "gptq", samples: int = 128,
            seq_len: int = 256, sens_norm: str = "layer", candidates: list[str] | None = None) -> dict:
    """Quantize ``demo`` uniformly and mixed at each budget and compare both with the bf16 model.

    Returns:
        {"demo", "method", "sens_norm", "budgets": {bits: {"uniform": {...}, "mixed": {...},
        "kld_ratio_mixed_over_uniform": float}}}.
    """
    demo_p = pathlib.Path(demo)
    calib, text = demo_p / "calib.txt", demo_p / "eval.txt"
    out: dict = {"demo": str(demo_p), "method": method, "sens_norm": sens_norm, "budgets": {}}
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for b in bits:
            row = {}
            for kind in ("uniform", "mixed"):
                t = time.time()
                dst = pathlib.Path(tmp) / f"{kind}-{b}"
                s = quantize_checkpoint(demo_p, dst, bits=b, calib=str(calib), method=method, uniform=kind == "uniform",
                                        device=device, progress=False, n_samples=samples, seq_len=seq_len,
                                        sens_norm=sens_norm, candidates=candidates)
                r = compare(demo_p, dst, text, device=device)
                row[kind] = dict(r, avg_bits=s["avg_bits"], histogram=s["histogram"], seconds=round(time.time() - t, 1))
            row["kld_ratio_mixed_over_uniform"] = row["mixed"]["kld"] / max(row["uniform"]["kld"], 1e-30)
            out["budgets"][str(b)] = row
            print(f"bits {b}: KLD mixed/uniform = {row['kld_ratio_mixed_over_uniform']:.3f} "
                  f"({row['mixed']['kld']:.4g} vs {row['uniform']['kld']:.4g}; top-1 {row['mixed']['top1']:.3f} vs "
                  f"{row['uniform']['top1']:.3f}; mixed {row['mixed']['histogram']})", flush=True)
    out["seconds"] = round(time.time() - t_all, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.25, 3.25])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--device")
    ap.add_argument("--sens-norm", choices=["layer", "none"], default="layer")
    ap.add_argument("--candidates", help="comma list of scheme names (default: quantize's default candidates)")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args(argv)
    res = measure(a.demo, a.bits, a.device, a.method, sens_norm=a.sens_norm,
                  candidates=a.candidates.split(",") if a.candidates else None)
    txt = json.dumps(res, indent=1)
    print(txt)
    for b, row in res["budgets"].items():
        print(f"RATIO bits={b} kld_mixed/kld_uniform={row['kld_ratio_mixed_over_uniform']:.4f}")
    if a.json:
        pathlib.Path(a.json).write_text(txt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
