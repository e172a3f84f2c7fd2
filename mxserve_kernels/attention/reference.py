"""Pure-PyTorch reference of the quantized paged KV cache (bit-exact oracle for store, fp32 oracle for attention).

Same signatures as the launchers in ``kv_store.py`` / ``decode.py`` / ``prefill.py``; also the CPU runtime path.
Slot layout and quantization rule: ``kv_format.py``. ``QuantizedKVCache`` (in ``kv_cache.py``) builds the
per-sequence API used by the embedded CPU engine on top of these functions.

Channel permutations: ``k_perm``/``v_perm`` are ``[H, D]`` int tensors (None = identity). Slot channel ``j`` of head
``h`` holds original channel ``perm[h, j]``; dequantization returns the ORIGINAL channel order.
"""
from __future__ import annotations

import torch

from mxserve_kernels.attention.kv_format import TERNARY, KVSlotFormat, qmax_of

_POW3 = (1, 3, 9, 27, 81)


# ---- one tensor (K or V) --------------------------------------------------------------------------------------
def quantize_codes(x: torch.Tensor, bits: float, group: int, clip: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token group quantization (fp32 math, round-half-up).

    Args:
        x: [N, D] float (already permuted).
        bits: 2, 4, 8 or 1.5 (ternary). group: G channels per group. clip: scalar in (0, 1].
    Returns:
        codes [N, D] uint8, scale [N, D/G] fp16, zero [N, D/G] fp16.
    """
    n, d = x.shape
    qmax = float(qmax_of(bits))
    xg = x.float().reshape(n, d // group, group)
    c = torch.tensor(clip, dtype=torch.float32)
    lo = xg.amin(-1) * c
    hi = xg.amax(-1) * c
    scale = torch.clamp((hi - lo) / qmax, min=1e-8).to(torch.float16)
    zero = lo.to(torch.float16)
    q = torch.floor((xg - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 0.5)
    q = torch.clamp(q, 0.0, qmax).to(torch.uint8)
    return q.reshape(n, d), scale, zero


def pack_codes(codes: torch.Tensor, bits: float, group: int) -> torch.Tensor:
    """[N, D] uint8 codes -> [N, code_bytes] uint8 (layout in ``kv_format``)."""
    n, d = codes.shape
    c = codes.to(torch.int32)
    if bits == TERNARY:
        nb = (group + 4) // 5
        g = torch.zeros(n, d // group, nb * 5, dtype=torch.int32, device=codes.device)
        g[..., :group] = c.reshape(n, d // group, group)
        w = torch.tensor(_POW3, dtype=torch.int32, device=codes.device)
        return (g.reshape(n, d // group, nb, 5) * w).sum(-1).reshape(n, (d // group) * nb).to(torch.uint8)
    b = int(bits)
    per = 8 // b
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * b
    return (c.reshape(n, d // per, per) << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: float, group: int, d: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: [N, code_bytes] uint8 -> [N, D] uint8."""
    n = packed.shape[0]
    p = packed.to(torch.int32)
    if bits == TERNARY:
        nb = (group + 4) // 5
        w = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)
        t = (p.reshape(n, d // group, nb, 1) // w) % 3
        return t.reshape(n, d // group, nb * 5)[..., :group].reshape(n, d).to(torch.uint8)
    b = int(bits)
    per = 8 // b
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * b
    return ((p.unsqueeze(-1) >> shifts) & ((1 << b) - 1)).reshape(n, d).to(torch.uint8)


def _meta_bytes(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, nG] fp16 scale/zero -> [N, nG*4] uint8 (scale, zero little-endian per group)."""
    sz = torch.stack([scale, zero], dim=-1).contiguous()  # [N, nG, 2] fp16
    return sz.view(torch.uint8).reshape(scale.shape[0], scale.shape[1] * 4)


def _meta_from_bytes(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sz = b.contiguous().view(torch.float16).reshape(b.shape[0], b.shape[1] // 4, 2)
    return sz[..., 0], sz[..., 1]


def _permute(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """x [N, H, D] -> slot order: out[:, h, j] = x[:, h, perm[h, j]]."""
    if perm is None:
        return x
    return torch.gather(x, 2, perm.to(x.device, torch.int64).unsqueeze(0).expand(x.shape[0], -1, -1))


def _unpermute(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    if perm is None:
        return x
    out = torch.empty_like(x)
    out.scatter_(2, perm.to(x.device, torch.int64).unsqueeze(0).expand(x.shape[0], -1, -1), x)
    return out


# ---- slots --------------------------------------------------------------------------------------------------
def quantize_slots(k: torch.Tensor, v: torch.Tensor, fmt: KVSlotFormat, k_perm: torch.Tensor | None = None,
                   v_perm: torch.Tensor | None = None, k_clip: float = 1.0, v_clip: float = 1.0) -> torch.Tensor:
    """Quantize and pack K/V of T tokens into slots.

    Args:
        k, v: [T, H, D] float. k_perm, v_perm: [H, D] or None. k_clip, v_clip: per-layer clip ratios.
    Returns:
        [T, H, slot_bytes] uint8.
    """
    t, h, d = k.shape
    if d != fmt.head_dim or v.shape != k.shape:
        raise ValueError(f"quantize_slots: k {list(k.shape)} / v {list(v.shape)} vs head_dim={fmt.head_dim}")
    out = torch.zeros(t * h, fmt.slot_bytes, dtype=torch.uint8, device=k.device)
    for x, perm, bits, g, clip, off, moff, nbytes in (
            (k, k_perm, fmt.k_bits, fmt.k_group, k_clip, fmt.k_off, fmt.k_meta_off, fmt.k_code_bytes),
            (v, v_perm, fmt.v_bits, fmt.v_group, v_clip, fmt.v_off, fmt.v_meta_off, fmt.v_code_bytes)):
        xs = _permute(x, perm).reshape(t * h, d)
        codes, scale, zero = quantize_codes(xs, bits, g, clip)
        out[:, off:off + nbytes] = pack_codes(codes, bits, g)
        meta = _meta_bytes(scale, zero)
        out[:, moff:moff + meta.shape[1]] = meta
    return out.reshape(t, h, fmt.slot_bytes)


def dequantize_slots(slots: torch.Tensor, fmt: KVSlotFormat, k_perm: torch.Tensor | None = None,
                     v_perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots -> (K, V) in fp32, original channel order.

    Args:
        slots: [T, H, slot_bytes] uint8.
    Returns:
        k, v: [T, H, D] fp32.
    """
    t, h, _ = slots.shape
    d = fmt.head_dim
    flat = slots.reshape(t * h, slots.shape[-1])
    res = []
    for perm, bits, g, off, moff, nbytes in (
            (k_perm, fmt.k_bits, fmt.k_group, fmt.k_off, fmt.k_meta_off, fmt.k_code_bytes),
            (v_perm, fmt.v_bits, fmt.v_group, fmt.v_off, fmt.v_meta_off, fmt.v_code_bytes)):
        codes = unpack_codes(flat[:, off:off + nbytes], bits, g, d).float()
        scale, zero = _meta_from_bytes(flat[:, moff:moff + 4 * (d // g)])
        x = codes.reshape(t * h, d // g, g) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
        res.append(_unpermute(x.reshape(t, h, d), perm))
    return res[0], res[1]


def store_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, fmt: KVSlotFormat,
             k_perm: torch.Tensor | None = None, v_perm: torch.Tensor | None = None, k_clip: float = 1.0,
             v_clip: float = 1.0) -> None:
    """Quantize-and-store T new tokens into a paged cache, in place.

    Args:
        cache: [num_pages, P, H, slot_bytes] uint8. k, v: [T, H, D].
        slot_mapping: [T] int (page * P + offset); negative entries are skipped (padding).
    """
    npg, p, h, sb = cache.shape
    keep = slot_mapping >= 0
    slots = quantize_slots(k[keep], v[keep], fmt, k_perm, v_perm, k_clip, v_clip)
    cache.view(npg * p, h, sb)[slot_mapping[keep].long()] = slots


def gather_pages(cache: torch.Tensor, block_table_row: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Slots of positions [0, n_tokens) of one request: [n_tokens, H, slot_bytes]."""
    p = cache.shape[1]
    pos = torch.arange(n_tokens, device=cache.device)
    # two index tensors, no view: works on the strided prefix view of a shared (larger) slot without copying
    return cache[block_table_row.long().to(cache.device)[pos // p], pos % p]


# ---- attention --------------------------------------------------------------------------------------------------
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """fp32 softmax attention with GQA. q [Tq, Hq, D], k/v [Tk, H, D], mask [Tq, Tk] bool (True = keep)."""
    hq, h = q.shape[1], k.shape[1]
    rep = hq // h
    kk = k.float().repeat_interleave(rep, dim=1)
    vv = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kk) * scale
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv)


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, pk_lo: torch.Tensor,
                           pk_hi: torch.Tensor, fp_k: torch.Tensor, fp_v: torch.Tensor, fp_len: torch.Tensor,
                           fmt: KVSlotFormat, scale: float, k_perm: torch.Tensor | None = None,
                           v_perm: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per request over packed positions [pk_lo, pk_hi) plus fp tokens fp_k[b, :fp_len[b]].

    The fp tokens are the full-precision zones (sinks, recent window) and the current token (past-only);
    the caller decides which positions are packed and which are fp.

    Args:
        q: [B, Hq, D]. cache: [num_pages, P, H, slot_bytes] uint8. block_table: [B, max_pages] int.
        pk_lo, pk_hi: [B] int. fp_k, fp_v: [B, F, H, D]. fp_len: [B] int.
    Returns:
        [B, Hq, D] fp32.
    """
    outs = []
    for b in range(q.shape[0]):
        lo, hi, nf = int(pk_lo[b]), int(pk_hi[b]), int(fp_len[b])
        slots = gather_pages(cache, block_table[b], max(hi, 0))[lo:hi]
        kq, vq = dequantize_slots(slots, fmt, k_perm, v_perm)
        k = torch.cat([kq, fp_k[b, :nf].float()])
        v = torch.cat([vq, fp_v[b, :nf].float()])
        outs.append(_attend(q[b:b + 1], k, v, scale)[0])
    return torch.stack(outs)


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            ctx_lens: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                            fmt: KVSlotFormat, scale: float, k_perm: torch.Tensor | None = None,
                            v_perm: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill / continuation: each request's new chunk attends causally to itself in full precision and to its
    ``ctx_lens[b]`` cached tokens dequantized from the packed pages.

    Args:
        q: [T, Hq, D]; k, v: [T, H, D] (the new tokens, unquantized). cu_seqlens_q: [B+1] int.
        ctx_lens: [B] int. cache, block_table: as in ``paged_decode_attention``.
    Returns:
        [T, Hq, D] fp32.
    """
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b in range(len(cu_seqlens_q) - 1):
        s, e, c = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(ctx_lens[b])
        n = e - s
        kc, vc = dequantize_slots(gather_pages(cache, block_table[b], c), fmt, k_perm, v_perm)
        kk = torch.cat([kc, k[s:e].float()])
        vv = torch.cat([vc, v[s:e].float()])
        mask = torch.ones(n, c + n, dtype=torch.bool, device=q.device)
        mask[:, c:] = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
        out[s:e] = _attend(q[s:e], kk, vv, scale, mask)
    return out


# ---- per-sequence API for the embedded CPU engine ------------------------------------------------------------------
class QuantizedKVCache:
    """One attention layer's quantized KV cache for many sequences, with FP sinks, an FP recent window and
    past-only quantization (CPU reference runtime; the embedded engine's KV cache).

    Lifecycle: ``append(seq, k, v)`` the new tokens of a step (prefill chunk or one decode token), then
    ``attend(seq, q)`` with the queries of exactly those tokens; ``free(seq)`` when the sequence ends.

    Which keys a query at position p reads in full precision: positions < ``sink``, positions j with
    p - j < ``window`` (the most recent ``window`` tokens, p itself included), and every token of the chunk
    appended last (exact prefill, past-only decode). Everything else is read from the packed slots; every token
    is quantized exactly once, when appended.

    Args:
        fmt: slot format. num_kv_heads: H. sink: S full-precision first tokens. window: W recent tokens.
        k_perm, v_perm: [H, D] channel orders or None. k_clip, v_clip: clip ratios.
    """

    def __init__(self, fmt: KVSlotFormat, num_kv_heads: int, sink: int = 4, window: int = 128,
                 k_perm: torch.Tensor | None = None, v_perm: torch.Tensor | None = None,
                 k_clip: float = 1.0, v_clip: float = 1.0) -> None:
        if sink < 0 or window < 0:
            raise ValueError(f"QuantizedKVCache: sink={sink} and window={window} must be >= 0")
        self.fmt, self.h, self.sink, self.window = fmt, num_kv_heads, sink, window
        self.k_perm, self.v_perm, self.k_clip, self.v_clip = k_perm, v_perm, k_clip, v_clip
        self._slots: dict[object, torch.Tensor] = {}   # seq -> [L, H, slot_bytes] uint8
        self._fp: dict[object, tuple[int, torch.Tensor, torch.Tensor]] = {}  # seq -> (start pos, k, v) fp tail
        self._sink: dict[object, tuple[torch.Tensor, torch.Tensor]] = {}
        self._chunk: dict[object, int] = {}

    def length(self, seq: object) -> int:
        """Tokens stored for ``seq``."""
        s = self._slots.get(seq)
        return 0 if s is None else s.shape[0]

    def append(self, seq: object, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and store new tokens. k, v: [T, H, D]."""
        if k.ndim != 3 or k.shape[1] != self.h or k.shape[2] != self.fmt.head_dim or v.shape != k.shape:
            raise ValueError(f"QuantizedKVCache.append: k {list(k.shape)} / v {list(v.shape)}, expected "
                             f"[T, {self.h}, {self.fmt.head_dim}]")
        n0 = self.length(seq)
        new = quantize_slots(k, v, self.fmt, self.k_perm, self.v_perm, self.k_clip, self.v_clip)
        self._slots[seq] = new if n0 == 0 else torch.cat([self._slots[seq], new])
        ks, vs = self._sink.get(seq, (k[:0], v[:0]))
        need = max(self.sink - ks.shape[0], 0)
        self._sink[seq] = (torch.cat([ks, k[:need]]), torch.cat([vs, v[:need]]))
        start, fk, fv = self._fp.get(seq, (0, k[:0], v[:0]))
        keep = max(self.window - 1, 0)  # W-1 older tokens + the new chunk cover every query's window
        drop = max(fk.shape[0] - keep, 0)
        self._fp[seq] = (start + drop, torch.cat([fk[drop:], k]), torch.cat([fv[drop:], v]))
        self._chunk[seq] = k.shape[0]

    def attend(self, seq: object, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Causal attention of the last appended chunk's queries.

        Args:
            q: [Tq, Hq, D] with Tq == tokens appended by the last ``append``.
        Returns:
            [Tq, Hq, D] fp32.
        """
        n = self.length(seq)
        tq = q.shape[0]
        if tq != self._chunk.get(seq, -1):
            raise ValueError(f"QuantizedKVCache.attend: {tq} queries but the last append had "
                             f"{self._chunk.get(seq)} tokens")
        kq, vq = dequantize_slots(self._slots[seq], self.fmt, self.k_perm, self.v_perm)
        ks, vs = self._sink[seq]
        start, fk, fv = self._fp[seq]
        ns = ks.shape[0]
        # FP copies: sinks and the kept tail; overlapping positions are identical tokens
        kq[:ns], vq[:ns] = ks.float(), vs.float()
        kfull = kq.clone()
        vfull = vq.clone()
        kfull[start:], vfull[start:] = fk.float(), fv.float()
        pos_q = torch.arange(n - tq, n).unsqueeze(1)         # [Tq, 1]
        pos_k = torch.arange(n).unsqueeze(0)                  # [1, L]
        use_fp = (pos_k < ns) | (pos_q - pos_k < self.window) | (pos_k >= n - tq)
        causal = pos_k <= pos_q
        # two-source attention: scores from both copies, the mask picks per (query, key) which one counts
        hq, h = q.shape[1], self.h
        rep = hq // h
        qf = q.float()
        s_fp = torch.einsum("qhd,khd->hqk", qf, kfull.repeat_interleave(rep, 1)) * scale
        s_q = torch.einsum("qhd,khd->hqk", qf, kq.repeat_interleave(rep, 1)) * scale
        s = torch.where(use_fp.unsqueeze(0), s_fp, s_q).masked_fill(~causal.unsqueeze(0), float("-inf"))
        p = torch.softmax(s, dim=-1)
        p_fp = p * use_fp.unsqueeze(0)
        return (torch.einsum("hqk,khd->qhd", p_fp, vfull.repeat_interleave(rep, 1))
                + torch.einsum("hqk,khd->qhd", p - p_fp, vq.repeat_interleave(rep, 1)))

    def free(self, seq: object) -> None:
        """Drop a sequence."""
        for d in (self._slots, self._fp, self._sink, self._chunk):
            d.pop(seq, None)

    def nbytes(self, seq: object) -> int:
        """Bytes held for ``seq``: packed slots + FP sinks + FP tail (bf16/fp16 inputs count 2 bytes)."""
        if seq not in self._slots:
            return 0
        fp = sum(t.numel() * t.element_size() for t in (*self._sink[seq], *self._fp[seq][1:]))
        return self._slots[seq].numel() + fp
