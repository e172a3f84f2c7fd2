"""``mxserve demo-model``: train the small demo Qwen3-MoE (quality is measured on it)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo-model", help="train the small demo Qwen3-MoE on local Python sources",
                       description="Train a small Qwen3-MoE from scratch (seeded, deterministic data order) on the "
                                   "Python standard library's sources; writes checkpoint, tokenizer, eval.txt, "
                                   "calib.txt, train_log.json and loss_curve.png.")
    p.add_argument("--out", required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--preset", choices=["cpu", "gpu"], help="default: gpu on cuda, else cpu")
    p.add_argument("--steps", type=int, help="override the preset's step count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from mxserve.models.demo import train_demo_model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    preset = args.preset or ("gpu" if device == "cuda" else "cpu")
    log = train_demo_model(args.out, preset=preset, device=device, steps=args.steps, seed=args.seed,
                           force=args.force)
    print(f"wrote {args.out}: {log['params'] / 1e6:.1f}M params, {log['steps_run']} steps in {log['seconds']} s, "
          f"held-out loss {log['heldout_loss']:.3f} vs unigram {log['unigram_heldout_loss']:.3f} nats/token")
    return 0
