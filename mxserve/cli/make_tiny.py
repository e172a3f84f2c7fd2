"""``mxserve make-tiny``: a random MoE checkpoint + local tokenizer (tests, smoke serving, benchmark geometry)."""
from __future__ import annotations

from mxserve.models.arch import ARCHS


def add_parser(sub) -> None:
    from mxserve.models.tiny import PRESETS
    p = sub.add_parser("make-tiny", help="write a randomly initialised MoE checkpoint + tokenizer",
                       description="Write a randomly initialised MoE checkpoint (HF layout, bf16 safetensors) and a "
                                   "tokenizer trained locally on the Python standard library's sources.")
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen3_moe")
    p.add_argument("--preset", choices=sorted(PRESETS), help="real model geometry (random weights)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--layers", type=int, help="decoder layers (default 2, or the preset's)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--inter", type=int, default=64, help="expert intermediate size")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], help="where random weights are generated (default: cuda if present)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from mxserve.models.tiny import PRESETS, make_tiny
    layers = args.layers if args.layers is not None else (PRESETS[args.preset][1]["num_hidden_layers"]
                                                          if args.preset else 2)
    out = make_tiny(args.arch, args.out, layers=layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                    inter=args.inter, vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, seed=args.seed, preset=args.preset, device=args.device,
                    force=args.force, progress=True)
    print(f"wrote {out}")
    return 0
