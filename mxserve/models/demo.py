"""The demo model: a small Qwen3-MoE trained from scratch on the Python standard library's sources.

No weights can be downloaded, so quality (KLD, perplexity, greedy agreement) is measured on this model. Training is
seeded with a deterministic data order; the held-out split is every 20th stdlib file. ``mxserve demo-model``.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

from mxserve import envs


@dataclass(frozen=True)
class DemoPreset:
    """Model geometry and training schedule."""

    hidden: int
    layers: int
    experts: int
    top_k: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    seq: int
    batch: int
    steps: int
    lr: float
    corpus_bytes: int | None
    time_budget_s: float


PRESETS = {
    # ~1.5M params; <= 3 min on 2 CPU cores
    "cpu": DemoPreset(hidden=128, layers=2, experts=8, top_k=2, inter=128, heads=4, kv_heads=2, head_dim=32,
                      vocab=2048, seq=128, batch=8, steps=240, lr=4e-3, corpus_bytes=4 << 20, time_budget_s=120),
    # ~65M params; ~2 min on one H200. 900 steps = ~11 epochs of the 2.7M-token stdlib corpus: 3000 steps
    # overfit (held-out 1.32 at step 750 -> 1.92 at 3000, docs/results/2026-11-22_demo_model_gpu_*)
    "gpu": DemoPreset(hidden=512, layers=8, experts=16, top_k=2, inter=256, heads=8, kv_heads=4, head_dim=64,
                      vocab=8192, seq=512, batch=64, steps=900, lr=1.5e-3, corpus_bytes=None, time_budget_s=540),
}
EVAL_CHARS = 200_000
FINAL_EVAL_TOKENS = 32_768
CALIB_CHARS = 400_000


def _unigram_loss(train_ids, heldout_ids, vocab: int) -> float:
    """Held-out cross-entropy (nats/token) of an add-one-smoothed unigram model fit on the training tokens."""
    import torch
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout_ids].mean())


def _plot(losses: list[tuple[int, float]], evals: list[tuple[int, float]], unigram: float, path: pathlib.Path):
    """Loss curve PNG; skipped with a warning where matplotlib is missing (re-plot later with ``plot_log``)."""
    try:
        import matplotlib
    except ImportError:
        import warnings
        warnings.warn(f"matplotlib is not installed: {path.name} not written (see train_log.json)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in losses], [v for _, v in losses], label="train", lw=1)
    ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="held-out")
    ax.axhline(unigram, color="gray", ls="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("mxserve demo model (Qwen3-MoE on Python stdlib)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_demo_model(out_dir, *, preset: str = "cpu", device: str | None = None, steps: int | None = None,
                     seed: int = 0, force: bool = False, progress: bool = True) -> dict:
    """Train the demo Qwen3-MoE and write checkpoint + tokenizer + eval.txt + calib.txt + curve atomically.

    Returns:
        the training log dict (also written to ``train_log.json``).
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from mxserve.models.corpus import read_corpus
    from mxserve.models.tiny import build_config, tiny_config_kwargs
    from mxserve.models.tokenizer import train_tokenizer

    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    steps = steps or p.steps
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = pathlib.Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        t0 = time.time()
        torch.manual_seed(seed)
        train_text, held_text = read_corpus(max_bytes=p.corpus_bytes)
        tok = train_tokenizer(train_text[: 4 << 20], p.vocab, tmp)
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        train_ids = torch.tensor(tok(train_text).input_ids, dtype=torch.long)
        held_ids = torch.tensor(tok(held_text[:EVAL_CHARS]).input_ids, dtype=torch.long)
        (tmp / "eval.txt").write_text(held_text[:EVAL_CHARS])
        (tmp / "calib.txt").write_text(train_text[:CALIB_CHARS])
        kw = tiny_config_kwargs("qwen3_moe", layers=p.layers, experts=p.experts, top_k=p.top_k, hidden=p.hidden,
                                inter=p.inter, vocab=p.vocab, heads=p.heads, kv_heads=p.kv_heads,
                                head_dim=p.head_dim, max_pos=max(2048, 4 * p.seq))
        kw.update(eos_token_id=eos, pad_token_id=eos, router_aux_loss_coef=0.01, output_router_logits=True)
        cfg = build_config("qwen3_moe", kw)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device)
        n_params = sum(t.numel() for t in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.1)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        gen = torch.Generator().manual_seed(seed)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
            "cpu", enabled=False)
        unigram = _unigram_loss(train_ids, held_ids, p.vocab)

        def held_out_loss(max_tokens: int) -> float:
            model.eval()
            n = min(len(held_ids) - 1, max_tokens) // p.seq
            x = held_ids[: n * p.seq + 1]
            tot, cnt = 0.0, 0
            with torch.no_grad(), amp:
                for i in range(0, n, p.batch):
                    xb = torch.stack([x[j * p.seq:(j + 1) * p.seq + 1] for j in range(i, min(n, i + p.batch))])
                    xb = xb.to(device)
                    logits = model(xb[:, :-1]).logits.float()
                    tot += float(torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="sum"))
                    cnt += xb[:, 1:].numel()
            model.train()
            return tot / cnt

        losses, evals = [], []
        eval_every = max(1, steps // 4)
        curve_tokens = 16 * p.seq * p.batch // 8  # a cheap slice for the curve; the final number uses all
        done = 0
        for step in tqdm(range(steps), desc=f"training demo model ({preset}, {n_params / 1e6:.1f}M params)",
                         disable=not progress):
            starts = torch.randint(0, len(train_ids) - p.seq - 1, (p.batch,), generator=gen)
            xb = torch.stack([train_ids[s:s + p.seq + 1] for s in starts.tolist()]).to(device)
            with amp:
                outp = model(xb[:, :-1], labels=xb[:, :-1].clone())  # HF shifts labels internally
                loss = outp.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            done = step + 1
            if step % 10 == 0 or step == steps - 1:
                losses.append((step, float(loss.detach())))
            if (step + 1) % eval_every == 0:
                evals.append((step + 1, held_out_loss(curve_tokens)))
            if time.time() - t0 > p.time_budget_s:
                break  # keep the promised wall-clock bound on slow machines
        final = held_out_loss(FINAL_EVAL_TOKENS)
        evals = [e for e in evals if e[0] != done] + [(done, final)]
        model.config.output_router_logits = False
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [eos, tok.convert_tokens_to_ids("<|im_end|>")], "pad_token_id": eos,
             "do_sample": False}, indent=1))
        _plot(losses, evals, unigram, tmp / "loss_curve.png")
        log = {"preset": preset, "geometry": asdict(p), "steps_run": done, "seed": seed, "device": device,
               "params": n_params, "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
               "heldout_loss": evals[-1][1], "unigram_heldout_loss": unigram, "train_curve": losses,
               "heldout_curve": evals, "seconds": round(time.time() - t0, 1)}
        (tmp / "train_log.json").write_text(json.dumps(log, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return log
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot_log(log_path, png_path) -> None:
    """Re-draw the loss curve PNG from a ``train_log.json``."""
    log = json.loads(pathlib.Path(log_path).read_text())
    _plot(log["train_curve"], log["heldout_curve"], log["unigram_heldout_loss"], pathlib.Path(png_path))


def ensure_demo_model(cache_dir: str | None = None, *, preset: str | None = None, progress: bool = True) -> pathlib.Path:
    """The cached demo model directory, trained on first use (``cpu`` preset without CUDA, else ``gpu``)."""
    import torch
    preset = preset or ("gpu" if torch.cuda.is_available() else "cpu")
    path = pathlib.Path(cache_dir or envs.cache_dir()) / f"demo-qwen3moe-{preset}"
    if not (path / "train_log.json").exists():
        train_demo_model(path, preset=preset, force=True, progress=progress)
    return path
