"""Perplexity, mean KL divergence and top-1 agreement of a (quantized) checkpoint against a reference.

Both models are plain transformers models whose weights were dequantized from the checkpoint's canonical tensors
(``mxserve_kernels.quant.reference.dequantize``), evaluated in fp32 on CPU (tiny models) or bf16 on CUDA.
"""
from __future__ import annotations

import math
import pathlib

import torch

from mxserve.checkpoint.hf_model import load_model
from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.quant.calibration import read_text

DEFAULT_SEQ_LEN = 256
DEFAULT_MAX_TOKENS = 32768


def load_dequantized_model(path, device: str = "cpu", dtype: torch.dtype | None = None):
    """A transformers causal LM with every linear dequantized from ``path`` (plain or mxmoe checkpoint).

    Args:
        path: HF checkpoint directory.
        device: "cpu" or "cuda"; dtype defaults to fp32 on CPU and bf16 on CUDA.
    """
    dtype = dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)
    return load_model(HFCheckpoint(path), device=device, dtype=dtype)


def eval_ids(text_file, tokenizer_dir, vocab: int, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[N, S] token ids of the evaluation text (non-overlapping windows)."""
    from transformers import AutoTokenizer
    p = pathlib.Path(text_file)
    if not p.is_file():
        raise FileNotFoundError(f"--text {p}: not found")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = torch.tensor(tok(read_text(p), add_special_tokens=False)["input_ids"][:max_tokens], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"--text {p}: fewer than 2 tokens")
    if int(ids.max()) >= vocab:
        raise ValueError(f"--text {p}: token id {int(ids.max())} >= vocab {vocab}")
    s = min(seq_len, ids.numel())
    return ids[: ids.numel() // s * s].view(-1, s)


@torch.no_grad()
def compare(ref_dir, test_dir, text_file, *, device: str | None = None, seq_len: int = DEFAULT_SEQ_LEN,
            max_tokens: int = DEFAULT_MAX_TOKENS, batch: int = 4) -> dict:
    """Evaluate ``test_dir`` against ``ref_dir`` on ``text_file``.

    Returns:
        {"ppl_ref", "ppl", "kld" (mean per-token KL(ref || test), nats), "top1" (argmax agreement), "tokens"}.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref_ck = HFCheckpoint(ref_dir)
    ids = eval_ids(text_file, test_dir, ref_ck.config["vocab_size"], seq_len, max_tokens)
    ref = load_dequantized_model(ref_dir, device)
    ref_lp = []
    for b0 in range(0, ids.shape[0], batch):
        ref_lp.append(torch.log_softmax(ref(ids[b0:b0 + batch].to(device)).logits.float(), -1).cpu())
    del ref
    test = load_dequantized_model(test_dir, device)
    nll_r = nll_t = kld = agree = 0.0
    n_next = n_all = 0
    for i, b0 in enumerate(range(0, ids.shape[0], batch)):
        x = ids[b0:b0 + batch]
        lt = torch.log_softmax(test(x.to(device)).logits.float(), -1).cpu()
        lr = ref_lp[i]
        tgt = x[:, 1:]
        nll_r -= float(lr[:, :-1].gather(-1, tgt.unsqueeze(-1)).sum())
        nll_t -= float(lt[:, :-1].gather(-1, tgt.unsqueeze(-1)).sum())
        kld += float((lr.exp() * (lr - lt)).sum(-1).sum())
        agree += float((lr.argmax(-1) == lt.argmax(-1)).sum())
        n_next += tgt.numel()
        n_all += x.numel()
    return {"ppl_ref": math.exp(nll_r / n_next), "ppl": math.exp(nll_t / n_next), "kld": kld / n_all,
            "top1": agree / n_all, "tokens": n_all}
