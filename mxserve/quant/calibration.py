"""Calibration token batches: from a text file (.txt, or .jsonl with a "text" field), an HF dataset name (when
the hub is reachable), or synthetic random tokens (timing runs only)."""
from __future__ import annotations

import json
import pathlib

import torch

DEFAULT_SEQ_LEN = 512
DEFAULT_SAMPLES = 128


def read_text(path: pathlib.Path) -> str:
    """Text of a .txt file, or the "text" fields of a .jsonl file joined by blank lines."""
    if path.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
            text = rec.get("text") if isinstance(rec, dict) else rec if isinstance(rec, str) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{i + 1}: expected an object with a string 'text' field")
            parts.append(text)
        return "\n\n".join(parts)
    return path.read_text(encoding="utf-8")


def _hf_dataset_text(name: str, max_chars: int) -> str:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"--calib {name!r} is not a file and the 'datasets' package is not installed") from None
    cfg = None
    if ":" in name:
        name, cfg = name.split(":", 1)
    try:
        ds = datasets.load_dataset(name, cfg, split="train", streaming=True)
    except Exception as e:  # hub unreachable / unknown dataset: one clear error
        raise FileNotFoundError(f"--calib {name!r}: not a file and could not be loaded as an HF dataset ({e})") from None
    out, n = [], 0
    for rec in ds:
        t = rec.get("text") or ""
        out.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return "\n\n".join(out)


def calibration_ids(calib: str | None, tokenizer_dir: str | pathlib.Path, vocab_size: int, *,
                    seq_len: int = DEFAULT_SEQ_LEN, n_samples: int = DEFAULT_SAMPLES,
                    seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Token ids [N, S] for calibration and a provenance dict (source, tokens).

    Args:
        calib: path of a .txt/.jsonl file, an HF dataset name ("name" or "name:config"), or None for synthetic
            uniform random tokens (deterministic in ``seed``; only meaningful for timing).
        tokenizer_dir: checkpoint directory holding the tokenizer.
        vocab_size: model vocabulary (ids are checked against it).
    """
    if calib is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (n_samples, seq_len), generator=g)
        return ids, {"source": "synthetic-random", "tokens": ids.numel()}
    p = pathlib.Path(calib)
    text = read_text(p) if p.is_file() else _hf_dataset_text(calib, max_chars=seq_len * n_samples * 8)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except Exception as e:
        raise FileNotFoundError(f"{tokenizer_dir}: no usable tokenizer for calibration text ({e})") from None
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 16:
        raise ValueError(f"--calib {calib}: only {ids.numel()} tokens of calibration text")
    if int(ids.max()) >= vocab_size:
        raise ValueError(f"--calib {calib}: tokenizer produced id {int(ids.max())} >= model vocab {vocab_size}")
    s = min(seq_len, ids.numel())
    chunks = ids[: ids.numel() // s * s].view(-1, s)
    if chunks.shape[0] > n_samples:  # evenly spaced, deterministic
        sel = torch.linspace(0, chunks.shape[0] - 1, n_samples).round().long()
        chunks = chunks[sel]
    return chunks, {"source": str(calib), "tokens": chunks.numel()}
