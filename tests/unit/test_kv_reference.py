"""Reference quantized KV cache: slot layout (bit-exact), paged store, attention semantics (sinks, window,
past-only, batched vs per-request, chunked vs whole prefill)."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.attention import reference as R
from mxserve_kernels.attention.kv_format import TERNARY, KVSlotFormat, parse_kv_label
from tests.tolerances import ATTENTION, BIT_EXACT, KV_ATTN_SQNR_DB_MIN, KV_SQNR_DB_MIN, sqnr_db

BITS = [2, 4, 8, TERNARY]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d,group", [(64, 64), (128, 32), (80, 40)], ids=["D64g64", "D128g32", "D80g40-odd"])
def test_pack_unpack_roundtrip(bits, d, group):
    if bits != TERNARY and (group * int(bits)) % 8:
        pytest.skip("not whole bytes")
    qmax = 2 if bits == TERNARY else (1 << bits) - 1
    codes = torch.randint(0, qmax + 1, (7, d), dtype=torch.uint8)
    packed = R.pack_codes(codes, bits, group)
    fmt_bytes = KVSlotFormat(d, k_bits=bits, k_group=group, v_group=d if bits != TERNARY else group).k_code_bytes
    assert packed.shape == (7, fmt_bytes)
    torch.testing.assert_close(R.unpack_codes(packed, bits, group, d), codes, **BIT_EXACT)


def test_byte_layout_matches_spec():
    # 2-bit: channel d at bits (d%4)*2 of byte d//4; ternary: byte = t0 + 3t1 + 9t2 + 27t3 + 81t4
    c2 = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert R.pack_codes(c2, 2, 8).tolist() == [[1 + (2 << 2) + (3 << 4), 255]]
    t = torch.tensor([[2, 1, 0, 0, 1, 2, 2]], dtype=torch.uint8)  # group 7 -> 2 bytes, 3 padding trits
    assert R.pack_codes(t, TERNARY, 7).tolist() == [[2 + 3 + 81, 2 + 2 * 3]]


def test_slot_sizes_and_bits():
    f = KVSlotFormat(128, k_bits=2, v_bits=TERNARY, k_group=64, v_group=128)
    # K codes 32 B, V trits ceil(128/5)=26 B, K meta 2 groups * 4 B, V meta 1 group * 4 B
    assert (f.k_code_bytes, f.v_code_bytes, f.slot_bytes) == (32, 26, 32 + 26 + 8 + 4)
    assert f.bits_per_element() == pytest.approx(70 * 8 / 256)
    assert f.compression_vs(2) > 7.0
    assert parse_kv_label("K2V1.5") == (2, TERNARY) and parse_kv_label("k4v4") == (4, 4)
    with pytest.raises(ValueError, match="K3V9"):
        parse_kv_label("K3V9")
    with pytest.raises(ValueError, match="k_group"):
        KVSlotFormat(128, k_group=48)


@pytest.mark.parametrize("bits", BITS)
def test_quantize_quality_and_bounds(bits):
    x = torch.randn(256, 128)
    g = 128 if bits == TERNARY else 64
    codes, s, z = R.quantize_codes(x, bits, g, 1.0)
    qmax = 2 if bits == TERNARY else (1 << bits) - 1
    assert int(codes.max()) <= qmax
    deq = (codes.float().reshape(256, -1, g) * s.float().unsqueeze(-1) + z.float().unsqueeze(-1)).reshape(256, 128)
    # round-to-nearest: error within half a step (+ fp16 rounding of zero/scale, bounded by one step)
    step = s.float().repeat_interleave(g, dim=1)
    assert bool(((deq - x).abs() <= step).all())
    assert sqnr_db(x, deq) >= KV_SQNR_DB_MIN[bits]


def test_permutation_roundtrip_and_store_is_bit_exact():
    fmt = KVSlotFormat(64, k_bits=2, v_bits=TERNARY, k_group=32, v_group=64)
    h, t, p, npg = 3, 11, 4, 8
    k, v = torch.randn(t, h, 64), torch.randn(t, h, 64)
    kp = torch.stack([torch.randperm(64) for _ in range(h)])
    vp = torch.stack([torch.randperm(64) for _ in range(h)])
    slots = R.quantize_slots(k, v, fmt, kp, vp, 0.95, 0.9)
    cache = torch.zeros(npg, p, h, fmt.slot_bytes, dtype=torch.uint8)
    mapping = torch.randperm(npg * p)[:t]
    mapping[3] = -1  # padding token is skipped
    R.store_kv(cache, k, v, mapping, fmt, kp, vp, 0.95, 0.9)
    flat = cache.view(npg * p, h, -1)
    keep = mapping >= 0
    torch.testing.assert_close(flat[mapping[keep]], slots[keep], **BIT_EXACT)
    assert int(flat.sum(-1).sum(-1).count_nonzero()) == int(keep.sum())
    # dequantization undoes the permutation: identical to quantizing the permuted tensor without a permutation
    k_id, _ = R.dequantize_slots(R.quantize_slots(torch.gather(k, 2, kp.expand(t, -1, -1)), v, fmt), fmt)
    k_pm, _ = R.dequantize_slots(R.quantize_slots(k, v, fmt, kp, None), fmt, kp, None)
    torch.testing.assert_close(torch.gather(k_pm, 2, kp.expand(t, -1, -1)), k_id, **BIT_EXACT)


def _paged_setup(fmt, lens, h, p=4):
    b = len(lens)
    maxp = max((n + p - 1) // p for n in lens)
    pages = torch.randperm(b * maxp + 3)[: b * maxp].reshape(b, maxp)
    cache = torch.zeros(b * maxp + 3, p, h, fmt.slot_bytes, dtype=torch.uint8)
    ks, vs = [], []
    for i, n in enumerate(lens):
        k, v = torch.randn(n, h, fmt.head_dim), torch.randn(n, h, fmt.head_dim)
        pos = torch.arange(n)
        R.store_kv(cache, k, v, pages[i][pos // p] * p + pos % p, fmt)
        ks.append(k)
        vs.append(v)
    return cache, pages, ks, vs


def test_decode_batched_equals_per_request_and_dequant_attention():
    fmt = KVSlotFormat(32, k_bits=4, v_bits=2, k_group=16, v_group=32)
    h, hq, lens = 2, 6, [9, 1, 14]
    cache, pages, ks, vs = _paged_setup(fmt, lens, h)
    b = len(lens)
    q = torch.randn(b, hq, 32)
    fk, fv = torch.randn(b, 3, h, 32), torch.randn(b, 3, h, 32)
    lo, hi, nf = torch.tensor([2, 0, 0]), torch.tensor(lens), torch.tensor([3, 1, 0])
    out = R.paged_decode_attention(q, cache, pages, lo, hi, fk, fv, nf, fmt, 0.3)
    for i in range(b):
        one = R.paged_decode_attention(q[i:i + 1], cache, pages[i:i + 1], lo[i:i + 1], hi[i:i + 1], fk[i:i + 1],
                                       fv[i:i + 1], nf[i:i + 1], fmt, 0.3)
        torch.testing.assert_close(out[i:i + 1], one, **ATTENTION[torch.float32])
        kq, vq = R.dequantize_slots(R.quantize_slots(ks[i], vs[i], fmt), fmt)
        k = torch.cat([kq[int(lo[i]):], fk[i, :int(nf[i])]])
        v = torch.cat([vq[int(lo[i]):], fv[i, :int(nf[i])]])
        s = torch.einsum("hd,khd->hk", q[i], k.repeat_interleave(3, 1)) * 0.3
        ref = torch.einsum("hk,khd->hd", s.softmax(-1), v.repeat_interleave(3, 1))
        torch.testing.assert_close(out[i], ref, **ATTENTION[torch.float32])


def test_prefill_continuation_matches_decode_steps():
    fmt = KVSlotFormat(32, k_bits=2, v_bits=TERNARY, k_group=16, v_group=32)
    h, hq, n_ctx, n_new, p = 2, 4, 6, 3, 4
    k, v, q = torch.randn(n_ctx + n_new, h, 32), torch.randn(n_ctx + n_new, h, 32), torch.randn(n_new, hq, 32)
    cache = torch.zeros(6, p, h, fmt.slot_bytes, dtype=torch.uint8)
    table = torch.tensor([[5, 0, 3]])
    pos = torch.arange(n_ctx)
    R.store_kv(cache, k[:n_ctx], v[:n_ctx], table[0][pos // p] * p + pos % p, fmt)
    out = R.paged_prefill_attention(q, k[n_ctx:], v[n_ctx:], torch.tensor([0, n_new]), torch.tensor([n_ctx]),
                                    cache, table, fmt, 0.25)
    # query j sees the packed context + new tokens 0..j in full precision
    for j in range(n_new):
        fk = k[n_ctx:n_ctx + j + 1].unsqueeze(0)
        fv = v[n_ctx:n_ctx + j + 1].unsqueeze(0)
        dec = R.paged_decode_attention(q[j:j + 1], cache, table, torch.tensor([0]), torch.tensor([n_ctx]), fk, fv,
                                       torch.tensor([j + 1]), fmt, 0.25)
        torch.testing.assert_close(out[j:j + 1], dec, **ATTENTION[torch.float32])


def _exact(q, k, v, scale, q_pos):
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(q.shape[1] // k.shape[1], 1)) * scale
    s = s.masked_fill(torch.arange(k.shape[0])[None, None] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.repeat_interleave(q.shape[1] // k.shape[1], 1))


def test_cache_api_fp_zones():
    fmt = KVSlotFormat(32, k_bits=2, v_bits=TERNARY, k_group=16, v_group=32)
    h, hq, n = 2, 4, 20
    k, v, q = torch.randn(n, h, 32), torch.randn(n, h, 32), torch.randn(n, hq, 32)
    # window covering everything: identical to exact attention, in chunks and token by token
    big = R.QuantizedKVCache(fmt, h, sink=0, window=n)
    big.append("a", k[:12], v[:12])
    o1 = big.attend("a", q[:12], 0.2)
    torch.testing.assert_close(o1, _exact(q[:12], k[:12], v[:12], 0.2, torch.arange(12)), **ATTENTION[torch.float32])
    for t in range(12, n):
        big.append("a", k[t:t + 1], v[t:t + 1])
        torch.testing.assert_close(big.attend("a", q[t:t + 1], 0.2), _exact(q[t:t + 1], k[:t + 1], v[:t + 1], 0.2,
                                   torch.tensor([t])), **ATTENTION[torch.float32])
    # sinks + window at decode: fp for j < S and t - j < W, packed otherwise
    S, W = 2, 3
    c = R.QuantizedKVCache(fmt, h, sink=S, window=W)
    c.append("b", k[:n - 1], v[:n - 1])
    c.attend("b", q[:n - 1], 0.2)
    c.append("b", k[n - 1:], v[n - 1:])
    out = c.attend("b", q[n - 1:], 0.2)
    kq, vq = R.dequantize_slots(R.quantize_slots(k, v, fmt), fmt)
    fp = (torch.arange(n) < S) | (n - 1 - torch.arange(n) < W)
    kk = torch.where(fp[:, None, None], k, kq)
    vv = torch.where(fp[:, None, None], v, vq)
    torch.testing.assert_close(out, _exact(q[n - 1:], kk, vv, 0.2, torch.tensor([n - 1])), **ATTENTION[torch.float32])
    assert c.nbytes("b") < big.nbytes("a")
    with pytest.raises(ValueError, match="queries"):
        c.attend("b", q[:2], 0.2)
    c.free("b")
    assert c.length("b") == 0


@pytest.mark.parametrize("label", ["K8V8", "K4V4", "K4V2"])
def test_attention_quality_floor(label):
    kb, vb = parse_kv_label(label)
    fmt = KVSlotFormat(64, k_bits=kb, v_bits=vb, k_group=64, v_group=64)
    h, n = 2, 256
    k, v, q = torch.randn(n, h, 64), torch.randn(n, h, 64), torch.randn(1, 4, 64)
    c = R.QuantizedKVCache(fmt, h, sink=0, window=1)
    c.append(0, k[:-1], v[:-1])
    c.attend(0, q.expand(n - 1, -1, -1), 0.125)
    c.append(0, k[-1:], v[-1:])
    out = c.attend(0, q, 0.125)
    assert sqnr_db(_exact(q, k, v, 0.125, torch.tensor([n - 1])), out) >= KV_ATTN_SQNR_DB_MIN[label]
