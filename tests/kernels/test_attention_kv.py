"""GPU: Triton KV store (bit-exact) and paged decode (vs fp32 reference over the same pages) at real shapes, for every
packed-split path (``decode.PATHS``)."""
from __future__ import annotations

import pytest
import torch

from mxserve_kernels.attention import decode, kv_store, reference as R
from mxserve_kernels.attention.kv_format import KVSlotFormat
from tests.tolerances import ATTENTION

FMTS = [("K2V1.5", 2, 1.5, 64, 128), ("K4V2", 4, 2, 128, 128), ("K4V4", 4, 4, 128, 128), ("K8V8", 8, 8, 128, 128)]
GEOM = [("A3B-gqa8", 4, 32, 128), ("llama8b-gqa4", 8, 32, 128)]  # (name, H_kv, H_q, D)


@pytest.mark.parametrize("fmt_case", FMTS, ids=[f[0] for f in FMTS])
@pytest.mark.parametrize("geom", GEOM, ids=[g[0] for g in GEOM])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_and_decode(fmt_case, geom, dtype):
    _store_and_decode(fmt_case, geom, dtype, None)


RAW_FMTS = [f for f in FMTS if f[0] != "K8V8"]


@pytest.mark.parametrize("fmt_case", RAW_FMTS, ids=[f[0] for f in RAW_FMTS])
@pytest.mark.parametrize("geom", GEOM, ids=[g[0] for g in GEOM])
@pytest.mark.parametrize("path,dtype", [("raw_asm", torch.bfloat16), ("raw_asm", torch.float16),
                                        ("raw", torch.bfloat16), ("raw", torch.float32), ("unpack", torch.bfloat16)],
                         ids=["raw_asm-bf16", "raw_asm-fp16", "raw-bf16", "raw-fp32", "unpack-bf16"])
def test_decode_paths(fmt_case, geom, path, dtype):
    """Every packed-split implementation (dot on raw codes with the PTX unpack, its portable twin, the unpack
    fallback) vs the fp32 reference over the same pages, at the swept tilings."""
    _store_and_decode(fmt_case, geom, dtype, path)


def _store_and_decode(fmt_case, geom, dtype, path):
    _, kb, vb, kg, vg = fmt_case
    _, h, hq, d = geom
    fmt = KVSlotFormat(d, k_bits=kb, v_bits=vb, k_group=kg, v_group=vg)
    dev, p = "cuda", 16
    lens = [1, 17, 300, 1000, 0]  # T=1, not a multiple of P, long, empty packed range (fp token only)
    b = len(lens)
    maxp = max((n + p - 1) // p for n in lens)
    table = torch.randperm(b * maxp + 5, device=dev)[: b * maxp].reshape(b, maxp).to(torch.int32)
    cache_t = torch.zeros(b * maxp + 5, p, h, fmt.slot_bytes, dtype=torch.uint8, device=dev)
    cache_r = cache_t.clone()
    kp = torch.stack([torch.randperm(d) for _ in range(h)]).to(torch.int32).to(dev)
    vp = torch.stack([torch.randperm(d) for _ in range(h)]).to(torch.int32).to(dev)
    for i, n in enumerate(lens):
        k = torch.randn(n, h, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(n, h, d, device=dev, dtype=torch.bfloat16)
        pos = torch.arange(n, device=dev)
        slots = table[i][pos // p].long() * p + pos % p
        kv_store.store_kv(cache_t, k, v, slots, fmt, kp, vp, 0.95, 1.0)
        R.store_kv(cache_r, k, v, slots, fmt, kp, vp, 0.95, 1.0)
    assert torch.equal(cache_t, cache_r)
    q = torch.randn(b, hq, d, device=dev, dtype=dtype)
    fk = torch.randn(b, 1, h, d, device=dev, dtype=dtype)
    fv = torch.randn(b, 1, h, d, device=dev, dtype=dtype)
    lo = torch.zeros(b, dtype=torch.int32, device=dev)
    hi = torch.tensor(lens, dtype=torch.int32, device=dev)
    nf = torch.ones(b, dtype=torch.int32, device=dev)
    ref = R.paged_decode_attention(q.float(), cache_t, table, lo, hi, fk.float(), fv.float(), nf, fmt, d ** -0.5,
                                   kp, vp)
    # the tilings the bench sweeps: split counts (auto included), blocks that straddle pages, warps
    for ns, bn, nw in [(16, 64, 8), (None, 64, 8), (1, 32, 4), (7, 128, 8), (32, 16, 4), (4, 64, 2), (8, 32, 1)]:
        out = decode.paged_decode_attention(q, cache_t, table, lo, hi, fk, fv, nf, fmt, d ** -0.5, kp, vp,
                                            num_splits=ns, block_n=bn, num_warps=nw, path=path)
        torch.testing.assert_close(out.float(), ref, **ATTENTION[dtype],
                                   msg=f"path={path} splits={ns} block={bn} warps={nw}")
    one = decode.paged_decode_attention(q[2:3], cache_t, table[2:3], lo[2:3], hi[2:3], fk[2:3], fv[2:3], nf[2:3],
                                        fmt, d ** -0.5, kp, vp, num_splits=16, path=path)
    torch.testing.assert_close(out[2:3], one, **ATTENTION[dtype])
    buf = torch.empty(b, hq, d, device=dev, dtype=torch.float32)  # caller's buffer, other dtype than q
    res = decode.paged_decode_attention(q, cache_t, table, lo, hi, fk, fv, nf, fmt, d ** -0.5, kp, vp, out=buf,
                                        path=path)
    assert res is buf
    torch.testing.assert_close(buf, ref, **ATTENTION[dtype])
