"""``mxserve eval``: perplexity, mean KL divergence vs a reference model, and top-1 agreement."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity / KL divergence / top-1 agreement vs a reference model")
    p.add_argument("path", help="checkpoint to evaluate (mxmoe or plain)")
    p.add_argument("--ref", required=True, help="reference (bf16) checkpoint")
    p.add_argument("--text", required=True, help="evaluation text (.txt or .jsonl)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--device", help="cpu | cuda (default: cuda when present)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from mxserve.eval.compare import compare
    r = compare(args.ref, args.path, args.text, device=args.device, seq_len=args.seq_len, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"ppl {r['ppl']:.4f} (ref {r['ppl_ref']:.4f})  KLD {r['kld']:.5f}  top-1 {r['top1']:.4f}  "
              f"over {r['tokens']} tokens")
    return 0
