"""Issue-3 acceptance measurement: mixed plan vs uniform GPTQ at the same true bits on the demo model.

    python -m mxserve.eval.acceptance --demo DIR [--bits 2.25 3.25] [--json OUT] [--device cpu]

DIR is ``mxserve demo-model --out DIR`` (checkpoint + calib.txt + eval.txt). Writes one JSON object with, per
budget, the true average bits and {ppl, kld, top1} of the uniform checkpoint (the issue's baseline: int2_g128_asym
at 2.25, int3_g128_asym at 3.25, GPTQ) and of the mixed plan for each ``--sens-norm`` (default both "layer" and
"none"), and their KLD ratios; prints one ``RATIO`` line per ratio.
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


def measure(demo: str, bits: list[float], device: str | None, method: str = "gptq", samples: int = 128,
            seq_len: int = 256, sens_norms: tuple[str, ...] = ("layer", "none"),
            candidates: list[str] | None = None) -> dict:
    """Quantize ``demo`` uniformly and mixed at each budget and compare both with the bf16 model.

    Args:
        sens_norms: sensitivity normalisations to run the mixed plan with; the first is the headline
            ("mixed"), the others are reported as "mixed_<norm>" with their own ratios.
    Returns:
        {"demo", "method", "sens_norms", "seconds", "budgets": {bits: {"uniform": {...}, "mixed": {...},
        "mixed_<norm>": {...}, "kld_ratio_mixed_over_uniform": float, "kld_ratio_mixed_<norm>_over_uniform": ...}}}.
    """
    demo_p = pathlib.Path(demo)
    out: dict = {"demo": str(demo_p), "method": method, "sens_norms": list(sens_norms), "budgets": {}}
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for b in bits:
            row = {"uniform": _quantize_and_compare(demo_p, pathlib.Path(tmp) / f"uniform-{b}", b, device, method,
                                                    samples, seq_len, uniform=True, candidates=candidates)}
            for i, norm in enumerate(sens_norms):
                key = "mixed" if i == 0 else f"mixed_{norm}"
                row[key] = _quantize_and_compare(demo_p, pathlib.Path(tmp) / f"{key}-{b}", b, device, method,
                                                 samples, seq_len, sens_norm=norm, candidates=candidates)
                row[f"kld_ratio_{key}_over_uniform"] = row[key]["kld"] / max(row["uniform"]["kld"], 1e-30)
                print(f"bits {b} [{key}, sens-norm {norm}]: KLD mixed/uniform = "
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
    ap.add_argument("--sens-norm", choices=["layer", "none"], nargs="+", default=["layer", "none"],
                    help="mixed-plan sensitivity normalisation(s); the first is the headline 'mixed' row")
    ap.add_argument("--candidates", help="comma list of scheme names (default: quantize's default candidates)")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args(argv)
    res = measure(a.demo, a.bits, a.device, a.method, sens_norms=tuple(a.sens_norm),
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
