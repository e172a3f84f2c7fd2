"""``mxserve inspect``: true average bits, bits histogram, per-layer table and a layers x experts heatmap."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show the bit plan of an mxmoe checkpoint (table, histogram, heatmap)")
    p.add_argument("path", help="mxmoe checkpoint directory")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.add_argument("--png", help="heatmap path (default: DIR/bits_heatmap.png is NOT written unless given)")
    p.set_defaults(func=run)


def run(args) -> int:
    from mxserve.eval.inspect import heatmap, plan_summary
    s = plan_summary(args.path)
    if args.png:
        s["png"] = str(heatmap(s, args.png))
    if args.json:
        s = dict(s, grid=None)
        print(json.dumps(s, indent=1))
        return 0
    print(f"{s['path']}: {s['avg_bits']:.4f} average bits over expert weights (metadata included); "
          f"{s['stored_bits']:.4f} bits stored on disk")
    print("histogram (blocks):")
    for k, v in s["histogram"].items():
        print(f"  {k:28s} {v}")
    print(f"{'layer':40s} {'avg bits':>9s}  gate_up / down")
    for row in s["layers"]:
        print(f"{row['module']:40s} {row['avg_bits']:9.4f}  {row['gate_up']} / {row['down']}")
    if s["modules"]:
        print(f"dense linears: {len(s['modules'])} quantized ({sorted(set(s['modules'].values()))})")
    if args.png:
        print(f"heatmap: {s['png']}")
    return 0
