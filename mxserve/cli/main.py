"""``mxserve`` entry point. Each subcommand lives in its own module exposing ``add_parser(subparsers)``
(which registers the parser and sets ``func``); modules are imported lazily so ``mxserve --help`` stays fast and a
broken optional dependency only affects its own subcommand."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("mxserve.cli.make_tiny", "write a randomly initialised tiny MoE checkpoint + tokenizer"),
    "demo-model": ("mxserve.cli.demo_model", "train the small demo Qwen3-MoE on local Python sources"),
    "quantize": ("mxserve.cli.quantize", "quantize an HF MoE checkpoint to a mixed-precision mxmoe checkpoint"),
    "inspect": ("mxserve.cli.inspect", "show the bit plan of an mxmoe checkpoint (table, histogram, heatmap)"),
    "eval": ("mxserve.cli.eval", "perplexity / KL divergence / top-1 agreement vs a reference model"),
    "calibrate-kv": ("mxserve.cli.calibrate_kv", "calibrate KV-cache quantization for a checkpoint"),
    "bench": ("mxserve.cli.bench", "benchmarks against vLLM peers measured in the same run"),
    "serve": ("mxserve.cli.serve", "serve a model: vLLM on a GPU, the embedded engine without one"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mxserve", description="Mixed-precision MoE serving for vLLM")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_, add_help=False)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith(module):
                continue  # subcommand not present in this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(only)
    args, extra = parser.parse_known_args(argv)
    if args.version:
        from mxserve import __version__
        print(__version__)
        return 0
    if not args.command or not hasattr(args, "func"):
        parser.print_help()
        return 0 if not args.command else 2
    if extra and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"mxserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
