"""KV-cache quantization quality on a real checkpoint (CPU or GPU, torch reference): KLD vs a bf16 KV cache and a
long-context planted-key retrieval check, for our K2V1.5 / K4V2 / K4V4 and vLLM's int4_per_token_head emulated in
torch.

    python -m mxserve.kvcache.quality --model /tmp/demo --json /tmp/kvq.json [--seq-len 128] [--num-seqs 16]

Method: the HF model runs teacher-forced with a registered transformers attention function that, per layer, replaces
each query's view of the cache: keys/values of earlier positions are quantize->dequantized (``mxserve_kernels``
reference = the bytes the vLLM backend stores), the current token and the FP zones (``sink`` first tokens, ``window``
most recent) stay exact. Modes:
  * ``bf16``: every K/V rounded to bf16 (the reference distribution p).
  * ours, ``past-only`` (sink 0, window 0): what the vLLM backend does today; ``+zones``: the reference/embedded
    runtime with FP sinks and window (the window is clamped to a quarter of the context so it does not cover it).
    Channel orders and clip ratios are calibrated (``calibrate_model``) on ``calib.txt`` windows, scored on
    ``eval.txt`` windows (disjoint text).
  * ``int4_per_token_head``: vLLM 0.26's mode: a randomized Hadamard rotation (random signs, orthonormal), then per
    (token, head) asymmetric 4-bit (scale = (max-min)/15, rounded zero point), every token quantized including the
    current one (vLLM writes, then reads the cache).
Reported per mode: mean KLD(p_bf16 || p_mode) per token, top-1 agreement with bf16, perplexity, and for retrieval the
share of planted-value tokens recalled greedily (teacher-forced) and their mean logprob.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import Callable

import torch

from mxserve_kernels.attention import reference as R
from mxserve.io import write_json_atomic

_ATTN_NAME = "mxserve_kv_quality"
QDQ = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def hadamard(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [D, D] (D a power of two)."""
    if d & (d - 1):
        raise ValueError(f"hadamard: head_dim {d} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def int4_per_token_head(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """vLLM int4_per_token_head round trip of x [..., D] with rotation rot [D, D] (orthonormal): fp32 result."""
    y = x.float() @ rot
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp_min(1e-6)
    zp = torch.floor(-lo / scale + 0.5).clamp(0, 15)
    q = torch.floor(y / scale + zp + 0.5).clamp(0, 15)
    return ((q - zp) * scale) @ rot.T


def fp_mask(n: int, sink: int, window: int, exact_current: bool) -> torch.Tensor:
    """[N, N] bool: key j of query i is read in full precision (current token, first ``sink``, last ``window``)."""
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    m = (j < sink) | ((j > i - window) & (window > 0))
    return m | (j == i) if exact_current else m


def mixed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kq: torch.Tensor, vq: torch.Tensor,
                    fp: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention where key j of query i is exact when fp[i, j] and dequantized otherwise.

    Args:
        q: [B, Hq, N, D]; k, v, kq, vq: [B, H, N, D]; fp: [N, N] bool.
    Returns:
        [B, Hq, N, D] fp32.
    """
    rep = q.shape[1] // k.shape[1]
    k, v, kq, vq = (t.float().repeat_interleave(rep, 1) for t in (k, v, kq, vq))
    qf = q.float()
    s = torch.where(fp, qf @ k.transpose(-1, -2), qf @ kq.transpose(-1, -2)) * scale
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
    fpf = fp.to(p.dtype)
    return (p * fpf) @ v + (p * (1 - fpf)) @ vq


class KVMode:
    """One cache treatment: ``qdq(layer, k, v)`` ([B, H, N, D] each) and which keys stay exact."""

    def __init__(self, name: str, qdq: QDQ, sink: int = 0, window: int = 0, exact_current: bool = True,
                 mask_fn: Callable[[int], torch.Tensor] | None = None) -> None:
        self.name, self.qdq, self.sink, self.window, self.exact_current = name, qdq, sink, window, exact_current
        self.mask_fn = mask_fn  # N -> [N, N] bool exact-key mask, overriding the zones (e.g. vllm_mask)

    def mask(self, n: int) -> torch.Tensor:
        return self.mask_fn(n) if self.mask_fn is not None else fp_mask(n, self.sink, self.window,
                                                                        self.exact_current)


def vllm_mask(prompt_len: int) -> Callable[[int], torch.Tensor]:
    """What the vLLM backend computes for one request prefilled in one chunk, then decoded: prompt tokens see each
    other exactly (prefill attends the raw K/V), every decode query sees all earlier tokens packed and itself exact."""
    def fn(n: int) -> torch.Tensor:
        m = fp_mask(n, 0, 0, True)
        m[:prompt_len, :prompt_len] = True
        return m
    return fn


def bf16_mode() -> KVMode:
    def qdq(_layer, k, v):
        return k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
    return KVMode("bf16", qdq, exact_current=False)


def int4_mode(head_dim: int, seed: int = 0) -> KVMode:
    rot = rht(head_dim, seed)
    def qdq(_layer, k, v):
        r = rot.to(k.device)
        return int4_per_token_head(k, r), int4_per_token_head(v, r)
    return KVMode("int4_per_token_head", qdq, exact_current=False)


def mx_mode(name: str, kvc, head_dim: int, sink: int, window: int, rot: torch.Tensor | None = None) -> KVMode:
    """Our packed format with the calibrated per-layer config ``kvc`` (KVQuantConfig).

    ``rot`` [D, D] orthonormal (experiment, not in the runtime format): K and V are rotated before quantization and
    rotated back after (equivalently q and the output would be rotated in the kernel)."""
    def perm(p):
        return torch.tensor(p, dtype=torch.int32) if p is not None else None

    layers = [(lc, lc.slot_format(head_dim), perm(lc.k_perm), perm(lc.v_perm)) for lc in kvc.layers]

    def qdq(layer, k, v):
        lc, fmt, kp, vp = layers[layer]
        r = rot.to(k.device) if rot is not None else None
        if r is not None:
            k, v = k.float() @ r, v.float() @ r
        b, h, n, d = k.shape
        kt = k.transpose(1, 2).reshape(b * n, h, d)
        vt = v.transpose(1, 2).reshape(b * n, h, d)
        kd, vd = R.dequantize_slots(R.quantize_slots(kt, vt, fmt, kp, vp, lc.k_clip, lc.v_clip), fmt, kp, vp)
        kd, vd = kd.reshape(b, n, h, d).transpose(1, 2), vd.reshape(b, n, h, d).transpose(1, 2)
        if r is not None:
            kd, vd = kd @ r.T, vd @ r.T
        return kd, vd
    return KVMode(name, qdq, sink=sink, window=window)


def rht(head_dim: int, seed: int = 0) -> torch.Tensor:
    """Randomized Hadamard rotation [D, D] (random signs then Hadamard; orthonormal): x @ rht = H (D1 x)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (head_dim,), generator=g).float() * 2 - 1
    return signs.unsqueeze(1) * hadamard(head_dim)


def rotate_capture(per_layer, rot: torch.Tensor):
    """Captured (q, k, v, scale) with q, k, v rotated by ``rot`` (scores unchanged, outputs rotated)."""
    return [[(q @ rot, k @ rot, v @ rot, sc) for q, k, v, sc in layer] for layer in per_layer]


def run_mode(model, ids: torch.Tensor, mode: KVMode) -> torch.Tensor:
    """Teacher-forced logits [B, N, V] (fp32) of ``ids`` [B, N] with every attention layer under ``mode``."""
    from transformers import AttentionInterface

    def attn(module, query, key, value, attention_mask, scaling=None, **kw):
        n = query.shape[2]
        kq, vq = mode.qdq(module.layer_idx, key, value)
        fp = mode.mask(n).to(query.device)
        sc = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        out = mixed_attention(query, key, value, kq, vq, fp, sc)
        return out.transpose(1, 2).contiguous().to(query.dtype), None

    AttentionInterface.register(_ATTN_NAME, attn)
    old = model.config._attn_implementation
    model.set_attn_implementation(_ATTN_NAME)
    try:
        with torch.no_grad():
            return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()
    finally:
        model.set_attn_implementation(old)


def compare(ref_logits: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> dict:
    """KLD(ref || mode) per token, top-1 agreement and perplexity of the next token (positions 0..N-2)."""
    lp_ref = torch.log_softmax(ref_logits[:, :-1], -1)
    lp = torch.log_softmax(logits[:, :-1], -1)
    kld = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return {"kld": float(kld.mean()), "top1_agree": float((lp.argmax(-1) == lp_ref.argmax(-1)).float().mean()),
            "ppl": float(nll.mean().exp())}


def windows(tok, text: str, n: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """[n, seq_len] token windows from ``text`` (ValueError when it is too short)."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][offset:]
    if ids.numel() < n * seq_len:
        raise ValueError(f"text has {ids.numel()} tokens after offset {offset}, need {n * seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def planted_key_batch(tok, filler: str, n: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval prompts of exactly ``seq_len`` tokens: ``KEY = "value"`` planted at the start, code filler, and the
    key re-read at the end followed by its value. Returns (ids [n, seq_len], target mask [n, seq_len] marking the
    value tokens whose prediction is scored)."""
    g = torch.Generator().manual_seed(seed)
    words = ["alpha", "zebra", "quantum", "marble", "falcon", "copper", "violet", "tundra", "saffron", "glacier",
             "harbor", "nimbus", "pepper", "orchid", "cobalt", "lantern"]
    fill = tok(filler, add_special_tokens=False)["input_ids"]
    rows, masks = [], []
    for i in range(n):
        a, b = torch.randint(0, len(words), (2,), generator=g).tolist()
        key, val = f"SECRET_{i}", f"{words[a]}_{words[b]}"
        head = tok(f'{key} = "{val}"\n', add_special_tokens=False)["input_ids"]
        tail_q = tok(f'\nprint({key})  # "', add_special_tokens=False)["input_ids"]
        tail_v = tok(val, add_special_tokens=False)["input_ids"]
        room = seq_len - len(head) - len(tail_q) - len(tail_v)
        if room < seq_len // 2:
            raise ValueError(f"planted_key_batch: seq_len {seq_len} too short for the probe")
        start = i * 37 % max(1, len(fill) - room)
        row = head + fill[start:start + room] + tail_q + tail_v
        m = [0] * (len(row) - len(tail_v)) + [1] * len(tail_v)
        rows.append(row)
        masks.append(m)
    return torch.tensor(rows), torch.tensor(masks, dtype=torch.bool)


def retrieval(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Share of planted-value tokens predicted greedily (teacher-forced), all-tokens-recalled rate, mean logprob."""
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt, m = ids[:, 1:], mask[:, 1:]
    hit = (lp.argmax(-1) == tgt) & m
    tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    full = [bool(hit[i][m[i]].all()) for i in range(ids.shape[0])]
    return {"token_recall": float(hit.sum() / m.sum()), "exact_recall": sum(full) / len(full),
            "value_logprob": float(tok_lp[m].mean())}


def evaluate(model_dir: str, *, seq_len: int, num_seqs: int, labels: tuple[str, ...], calib_seqs: int = 4,
             zone_sink: int = 4, device: str = "cpu", rotate: bool = False) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mxserve.kvcache.bits import model_bits
    from mxserve.kvcache.capture import calibrate_model, capture_qkv
    d = pathlib.Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).to(device).eval()
    head_dim = model.config.head_dim
    calib_text = (d / "calib.txt").read_text() if (d / "calib.txt").exists() else None
    if (d / "eval.txt").exists():
        eval_text = (d / "eval.txt").read_text()
    else:  # checkpoints without the demo's text files: the local corpus's held-out part
        from mxserve.models.corpus import read_corpus
        eval_text = read_corpus(max_bytes=1 << 21)[1]
    if calib_text is None:  # disjoint halves
        calib_text, eval_text = eval_text[: len(eval_text) // 2], eval_text[len(eval_text) // 2:]
    ev = windows(tok, eval_text, num_seqs, seq_len)
    probe_ids, probe_mask = planted_key_batch(tok, eval_text[len(eval_text) // 2:], num_seqs, seq_len)
    per_layer = capture_qkv(model, list(windows(tok, calib_text, calib_seqs, seq_len)))
    window = seq_len // 4
    modes = [int4_mode(head_dim)]
    bits = {"int4_per_token_head": 4 + 32 / head_dim, "bf16": 16.0}
    for lab in labels:
        kvc = calibrate_model(per_layer, label=lab, sink=0, window=0)
        modes.append(mx_mode(f"{lab} past-only", kvc, head_dim, 0, 0))
        modes.append(mx_mode(f"{lab} +zones(s{zone_sink},w{window})", kvc, head_dim, zone_sink, window))
        bits[f"{lab} past-only"] = model_bits(kvc, head_dim)
        bits[f"{lab} +zones(s{zone_sink},w{window})"] = model_bits(
            type(kvc)(layers=kvc.layers, sink_tokens=zone_sink, window_tokens=window, meta=kvc.meta), head_dim,
            seq_len)
        if rotate:  # experiment: RHT instead of the channel order (calibrated on rotated q/k/v)
            rot = rht(head_dim, seed=1)
            kvr = calibrate_model(rotate_capture(per_layer, rot), label=lab, sink=0, window=0, reorder=False)
            modes.append(mx_mode(f"{lab}+RHT past-only", kvr, head_dim, 0, 0, rot))
            bits[f"{lab}+RHT past-only"] = model_bits(kvr, head_dim)
    ref = run_mode(model, ev, bf16_mode())
    ref_probe = run_mode(model, probe_ids, bf16_mode())
    out = {"model": str(d), "seq_len": seq_len, "num_seqs": num_seqs, "head_dim": head_dim,
           "modes": {"bf16": {**compare(ref, ref, ev), "bits": 16.0,
                              "retrieval": retrieval(ref_probe, probe_ids, probe_mask)}}}
    for m in modes:
        res = compare(ref, run_mode(model, ev, m), ev)
        res["bits"] = round(bits[m.name], 4)
        res["retrieval"] = retrieval(run_mode(model, probe_ids, m), probe_ids, probe_mask)
        out["modes"][m.name] = res
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint dir (eval.txt / calib.txt if present, else the "
                    "local corpus's held-out text)")
    ap.add_argument("--json", help="write the results here (atomically)")
    ap.add_argument("--seq-len", type=int, help="context length (default: the demo model's trained length)")
    ap.add_argument("--num-seqs", type=int, default=16)
    ap.add_argument("--labels", default="K2V1.5,K4V2,K4V4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rotate", action="store_true", help="also score each label with an RHT instead of the reorder")
    a = ap.parse_args(argv)
    seq = a.seq_len
    if seq is None:
        log = pathlib.Path(a.model) / "train_log.json"
        seq = int(json.loads(log.read_text()).get("geometry", {}).get("seq", 128)) if log.exists() else 128
    torch.manual_seed(0)
    res = evaluate(a.model, seq_len=seq, num_seqs=a.num_seqs, labels=tuple(x for x in a.labels.split(",") if x),
                   device=a.device, rotate=a.rotate)
    for name, r in res["modes"].items():
        rt = r["retrieval"]
        print(f"{name:34s} bits {r['bits']:7.4f}  KLD {r['kld']:.5f}  top1 {r['top1_agree']:.3f}  ppl {r['ppl']:8.3f}"
              f"  recall tok {rt['token_recall']:.3f} exact {rt['exact_recall']:.3f} lp {rt['value_logprob']:.3f}")
    if a.json:
        write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
