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
            seq_len: int = 256) -> dict:
    demo_p = pathlib.Path(demo)
    calib, text = demo_p / "calib.txt", demo_p / "eval.txt"
    out: dict = {"demo": str(demo_p), "method": method, "budgets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for b in bits:
            row = {}
            for kind in ("uniform", "mixed"):
                t = time.time()
                dst = pathlib.Path(tmp) / f"{kind}-{b}"
                s = quantize_checkpoint(demo_p, dst, bits=b, calib=str(calib), method=method, uniform=kind == "uniform",
                                        device=device, progress=False, n_samples=samples, seq_len=seq_len)
                r = compare(demo_p, dst, text, device=device)
                row[kind] = dict(r, avg_bits=s["avg_bits"], histogram=s["histogram"], seconds=round(time.time() - t, 1))
            row["kld_ratio_mixed_over_uniform"] = row["mixed"]["kld"] / max(row["uniform"]["kld"], 1e-30)
            out["budgets"][str(b)] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.25, 3.25])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--device")
    ap.add_argument("--json", help="write the result here too")
    a = ap.parse_args(argv)
    res = measure(a.demo, a.bits, a.device, a.method)
    txt = json.dumps(res, indent=1)
    print(txt)
    if a.json:
        pathlib.Path(a.json).write_text(txt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
