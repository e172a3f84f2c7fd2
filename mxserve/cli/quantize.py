"""``mxserve quantize``: HF bf16 MoE checkpoint -> mixed-precision mxmoe checkpoint (atomic HF-style directory)."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize an HF MoE checkpoint to a mixed-precision mxmoe checkpoint",
                       description="Quantize expert weights to a mixed-precision plan under an average-bits budget "
                                   "(metadata included): GPTQ/RTN, optional nested MWQ planes, exact MILP allocation.")
    p.add_argument("src", nargs="?", help="source HF checkpoint directory (bf16)")
    p.add_argument("--synthetic-source", metavar="PRESET",
                   help="instead of SRC: random weights of an `mxserve make-tiny` preset (e.g. qwen3-30b-a3b) "
                        "generated layer by layer on the device (timing runs; no bf16 checkpoint on disk)")
    p.add_argument("--layers", type=int, help="decoder layers of --synthetic-source (default: the preset's)")
    p.add_argument("--out", required=True, help="destination directory (written atomically)")
    p.add_argument("--bits", type=float, required=True, help="average bits per expert weight incl. scales/zeros")
    p.add_argument("--calib", help="calibration .txt/.jsonl or HF dataset name; omitted = synthetic random tokens")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--nested", action="store_true", help="MWQ int2 base + residual planes (3/4-bit prefixes)")
    p.add_argument("--attn-bits", type=int, choices=[2, 3, 4, 8, 16], help="attention linears (default bf16)")
    p.add_argument("--shared-bits", type=int, choices=[2, 3, 4, 8, 16],
                   help="shared-expert / dense-MLP linears (default bf16)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=128)
    p.add_argument("--uniform", action="store_true", help="baseline: every expert block at the scheme nearest --bits")
    p.add_argument("--cost-weight", type=float, default=0.0, help="r: trade accuracy for kernel time (0..1)")
    p.add_argument("--candidates", help="comma list of scheme names the allocator may pick (default: see docs)")
    p.add_argument("--clip-search", action="store_true", help="per-group clip-ratio search")
    p.add_argument("--sens-norm", choices=["layer", "none", "sqrt", "kld"], default="layer",
                   help="allocator sensitivity: squared output error relative to each layer's residual energy "
                        "(default), raw squared, sqrt (plain norm, MxMoE's exact metric), or kld (layers weighted "
                        "by a measured output-KL probe; loads the whole model: small models only)")
    p.add_argument("--no-sens-holdout", dest="sens_holdout", action="store_false",
                   help="score sensitivity on the tokens GPTQ was fitted on (default: held-out half)")
    p.add_argument("--per-layer-budget", action="store_true",
                   help="every layer meets --bits on its own (MxMoE per-layer solve) instead of the model average")
    p.add_argument("--hadamard", action="store_true",
                   help="rotate attention v_proj/o_proj per head by a randomised Hadamard before quantizing them "
                        "(exact offline, no runtime op; needs --attn-bits and a power-of-two head_dim; experts "
                        "are never rotated: docs/quantization.md)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=128, help="calibration sequences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when present)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _stderr_line(msg: str) -> None:
    """One progress line on stderr (stdout stays pure JSON with --json); tqdm-safe when bars are shown."""
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


def run(args) -> int:
    from mxserve.quant.api import quantize_checkpoint
    synthetic = None
    if args.synthetic_source:
        if args.src:
            raise ValueError("give either SRC or --synthetic-source, not both")
        from mxserve.models.tiny import PRESETS
        if args.synthetic_source not in PRESETS:
            raise ValueError(f"--synthetic-source {args.synthetic_source!r}: unknown preset; "
                             f"choose from {sorted(PRESETS)}")
        synthetic = (args.synthetic_source,
                     args.layers or PRESETS[args.synthetic_source][1]["num_hidden_layers"])
    elif not args.src:
        raise ValueError("SRC (a bf16 HF checkpoint directory) or --synthetic-source PRESET is required")
    elif args.layers:
        raise ValueError("--layers only applies to --synthetic-source")
    s = quantize_checkpoint(args.src, args.out, bits=args.bits, calib=args.calib, method=args.method,
                            nested=args.nested, attn_bits=args.attn_bits, shared_bits=args.shared_bits,
                            group_size=args.group_size, uniform=args.uniform, seed=args.seed, device=args.device,
                            progress=not args.json, seq_len=args.seq_len, n_samples=args.samples,
                            cost_weight=args.cost_weight, clip_search=args.clip_search, force=args.force,
                            candidates=args.candidates.split(",") if args.candidates else None,
                            sens_norm=args.sens_norm, per_layer_budget=args.per_layer_budget,
                            sens_holdout=args.sens_holdout, synthetic=synthetic,
                            hadamard=args.hadamard, log=_stderr_line)
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(f"wrote {s['dst']}: {s['avg_bits']:.4f} average bits (metadata included), "
              f"{s['histogram']}, {s['timings']['total_s']} s ({s['timings']['per_layer_s']} s per layer "
              f"x {s['layers']} layers)")
    return 0
