"""Triton KV kernels under ``TRITON_INTERPRET=1`` on tiny shapes (CPU): store bit-exact vs the reference, decode
vs the fp32 reference over the same packed pages, batched vs per-request.

The interpreter must be enabled before triton is imported, so each case runs this file in a subprocess
(``python tests/unit/test_kv_triton_interpret.py <case>``); the checks themselves live in ``_case_*``.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CASES = ["store", "decode", "decode_d48", "decode_raw", "prefill", "decode_one_token_views"]


@pytest.mark.parametrize("case", CASES)
def test_triton_interpret(case):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"case {case} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert f"OK {case}" in r.stdout


# ---- cases (run in the subprocess) -----------------------------------------------------------------------------
# shape grid: every tuple names its edge case
FORMATS = [  # (name, D, k_bits, v_bits, k_group, v_group)
    ("K2V1.5-D64", 64, 2, 1.5, 32, 64),
    ("K4V2-D32", 32, 4, 2, 16, 32),
    ("K8V4-D16", 16, 8, 4, 16, 8),
    ("K4V1.5-D48-g24-3groups", 48, 4, 1.5, 16, 24),
]


def _case_store():
    import torch
    from mxserve_kernels.attention import kv_store, reference as R
    from mxserve_kernels.attention.kv_format import KVSlotFormat
    for name, d, kb, vb, kg, vg in FORMATS:
        fmt = KVSlotFormat(d, k_bits=kb, v_bits=vb, k_group=kg, v_group=vg)
        for t, h, p in [(1, 1, 4), (7, 3, 4), (5, 2, 16)]:  # T=1; odd T and H; T < P
            torch.manual_seed(t * 31 + h)
            npg = 2 + (t + p - 1) // p
            k = (torch.randn(t, h, d) * 3).to(torch.float16)
            v = torch.randn(t, h, d, dtype=torch.float16)
            kp = torch.stack([torch.randperm(d) for _ in range(h)]).to(torch.int32)
            slots = torch.randperm(npg * p)[:t]
            if t > 2:
                slots[1] = -1
            for perm in (None, kp):
                a = torch.zeros(npg, p, h, fmt.slot_bytes, dtype=torch.uint8)
                b = a.clone()
                R.store_kv(a, k, v, slots, fmt, perm, None, 0.93, 1.0)
                kv_store.store_kv(b, k, v, slots, fmt, perm, None, 0.93, 1.0)
                assert torch.equal(a, b), f"store mismatch {name} t={t} h={h} perm={perm is not None}"
    print("OK store")


def _case_decode(formats=range(3), path=None):
    """Decode vs the reference; ``path`` = the packed-split implementation (None: the launcher's default, which is
    "unpack" under the interpreter; "raw": dot on raw codes, the portable twin of the GPU's "raw_asm")."""
    import torch
    from mxserve_kernels.attention import decode, reference as R
    from mxserve_kernels.attention.kv_format import KVSlotFormat
    from tests.tolerances import ATTENTION
    # (lens, H, Hq, P, block_n): a 1-token request, an empty packed range, lengths not multiple of P, GQA 3;
    # block_n 16 > P = 4 (tiles straddle pages, prefetch crosses page boundaries), 37 = 2 tiles + 5
    grid = [([1, 13, 0], 2, 6, 4, 4), ([9], 1, 1, 8, 4), ([37, 16, 5], 2, 4, 4, 16)]
    if path == "raw":  # + a page size that is not a power of two (the // and % branch of _page_split)
        grid = grid + [([23, 6], 2, 4, 6, 32)]
    for fi in formats:
        name, d, kb, vb, kg, vg = FORMATS[fi]
        fmt = KVSlotFormat(d, k_bits=kb, v_bits=vb, k_group=kg, v_group=vg)
        for lens, h, hq, p, bn in grid if fi < 3 else grid[2:]:
            torch.manual_seed(len(lens) + h + fi)
            b = len(lens)
            maxp = max(1, max((n + p - 1) // p for n in lens))
            pages = torch.randperm(b * maxp + 2)[: b * maxp].reshape(b, maxp).to(torch.int32)
            cache = torch.zeros(b * maxp + 2, p, h, fmt.slot_bytes, dtype=torch.uint8)
            kperm = torch.stack([torch.randperm(d) for _ in range(h)]).to(torch.int32)
            vperm = torch.stack([torch.randperm(d) for _ in range(h)]).to(torch.int32)
            for i, n in enumerate(lens):
                pos = torch.arange(n)
                R.store_kv(cache, torch.randn(n, h, d), torch.randn(n, h, d), pages[i][pos // p].long() * p + pos % p,
                           fmt, kperm, vperm)
            q = torch.randn(b, hq, d)
            nf = torch.tensor([1, 2, 0][:b], dtype=torch.int32) if b > 1 else torch.tensor([1], dtype=torch.int32)
            fk, fv = torch.randn(b, 2, h, d), torch.randn(b, 2, h, d)
            lo = torch.tensor([min(1, n) for n in lens], dtype=torch.int32)
            hi = torch.tensor(lens, dtype=torch.int32)
            perms = (kperm, vperm) if fi % 2 == 0 else (None, None)
            ref = R.paged_decode_attention(q, cache, pages, lo, hi, fk, fv, nf, fmt, 0.3, *perms)
            for ns in (1, 3, None) if path is None else (3,):  # raw: the split logic is shared, keep CI fast
                out = decode.paged_decode_attention(q, cache, pages, lo, hi, fk, fv, nf, fmt, 0.3, *perms,
                                                    num_splits=ns, block_n=bn, path=path)
                torch.testing.assert_close(out, ref, **ATTENTION[torch.float32], msg=f"{name} {lens} ns={ns}")
                if b > 1:  # batched vs per-request
                    one = decode.paged_decode_attention(q[1:2], cache, pages[1:2], lo[1:2], hi[1:2], fk[1:2],
                                                        fv[1:2], nf[1:2], fmt, 0.3, *perms, num_splits=ns,
                                                        block_n=bn, path=path)
                    torch.testing.assert_close(out[1:2], one, **ATTENTION[torch.float32])
            if bn == 16:  # half q / fp tokens (the tensor-core dot path; the 3.6 interpreter's bf16 dot is broken,
                # bf16 runs in tests/kernels), written into a caller's out buffer
                qb, fkb, fvb = q.half(), fk.half(), fv.half()
                refb = R.paged_decode_attention(qb.float(), cache, pages, lo, hi, fkb.float(), fvb.float(), nf, fmt,
                                                0.3, *perms)
                buf = torch.full_like(qb, float("nan"))
                res = decode.paged_decode_attention(qb, cache, pages, lo, hi, fkb, fvb, nf, fmt, 0.3, *perms,
                                                    num_splits=2, block_n=bn, out=buf, path=path)
                assert res is buf
                torch.testing.assert_close(buf.float(), refb, **ATTENTION[torch.float16], msg=f"{name} fp16")
    print("OK decode" + ("_d48" if 3 in formats and path is None else "") + ("_raw" if path else ""))


def _case_decode_raw():
    """The raw-code path on every format it supports (2/4-bit, ternary, 3 groups), and its refusals."""
    import torch
    from mxserve_kernels.attention import decode
    from mxserve_kernels.attention.kv_format import KVSlotFormat
    raw = [i for i, f in enumerate(FORMATS) if decode.raw_supported(KVSlotFormat(f[1], *f[2:]))]
    assert raw == [0, 1, 3], raw  # K8V4 (8-bit codes do not fit the bf16 mantissa) stays on "unpack"
    q = torch.zeros(1, 2, 16)
    k8 = KVSlotFormat(16, k_bits=8, v_bits=4, k_group=16, v_group=8)
    cache = torch.zeros(1, 4, 1, k8.slot_bytes, dtype=torch.uint8)
    args = (q, cache, torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16),
            torch.ones(1, dtype=torch.int32), k8, 0.3)
    for path, want in (("raw", "K8V4"), ("raw_asm", "K8V4"), ("fast", "not in")):
        try:
            decode.paged_decode_attention(*args, path=path)
        except ValueError as e:
            assert want in str(e), str(e)
        else:
            raise AssertionError(f"path={path} on K8V4 did not raise")
    assert decode.default_path(KVSlotFormat(64, 2, 1.5, 32, 64), torch.bfloat16, True) == "unpack"  # interpreted
    _case_decode([0, 1, 3], path="raw")


def _case_prefill():
    import torch
    from mxserve_kernels.attention import prefill, reference as R
    from mxserve_kernels.attention.kv_format import KVSlotFormat
    from tests.tolerances import ATTENTION
    fmt = KVSlotFormat(32, k_bits=2, v_bits=1.5, k_group=16, v_group=32)
    h, hq, p = 2, 4, 4
    ctx = [5, 0, 8]
    new = [3, 4, 1]
    b = len(ctx)
    pages = torch.arange(b * 4, dtype=torch.int32).reshape(b, 4).flip(0).contiguous()
    cache = torch.zeros(b * 4, p, h, fmt.slot_bytes, dtype=torch.uint8)
    for i, n in enumerate(ctx):
        pos = torch.arange(n)
        R.store_kv(cache, torch.randn(n, h, 32), torch.randn(n, h, 32), pages[i][pos // p].long() * p + pos % p, fmt)
    t = sum(new)
    q, k, v = torch.randn(t, hq, 32), torch.randn(t, h, 32), torch.randn(t, h, 32)
    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    cl = torch.tensor(ctx, dtype=torch.int32)
    ref = R.paged_prefill_attention(q, k, v, cu, cl, cache, pages, fmt, 0.2)
    out = prefill.paged_prefill_attention(q, k, v, cu, cl, cache, pages, fmt, 0.2)
    torch.testing.assert_close(out, ref, **ATTENTION[torch.float32])
    print("OK prefill")


def _case_decode_one_token_views():
    """One decode token: k after Qwen3's k-norm (its own [T, H, D] buffer), v a slice of the fused
    [T, (Hq + 2H) * D] qkv buffer, each made ``.contiguous()`` as the vLLM backend does: torch returns the views themselves (a size-1 dim's stride is
    ignored), so fp_k and fp_v differ in stride(0). Session 6: this raised "equal fp strides" in the first vLLM
    step with a single decode request. The result must equal the reference on copies."""
    import torch
    from mxserve_kernels.attention import decode, reference as R
    from mxserve_kernels.attention.kv_format import KVSlotFormat
    from tests.tolerances import ATTENTION
    name, d, kb, vb, kg, vg = FORMATS[0]
    fmt = KVSlotFormat(d, k_bits=kb, v_bits=vb, k_group=kg, v_group=vg)
    h, hq, p, n = 2, 4, 4, 11
    torch.manual_seed(5)
    pages = torch.tensor([[3, 0, 2]], dtype=torch.int32)
    cache = torch.zeros(5, p, h, fmt.slot_bytes, dtype=torch.uint8)
    pos = torch.arange(n)
    R.store_kv(cache, torch.randn(n, h, d), torch.randn(n, h, d), pages[0][pos // p].long() * p + pos % p, fmt)
    qkv = torch.randn(3, (hq + 2 * h) * d)
    q = qkv[:1, : hq * d].view(1, hq, d)
    k = torch.nn.functional.rms_norm(qkv[:, hq * d: (hq + h) * d].reshape(3, h, d), (d,))  # k-norm: new buffer
    v = qkv[:, (hq + h) * d:].view(3, h, d)                                                 # v: a qkv slice
    fk, fv = k[:1].contiguous().unsqueeze(1), v[:1].contiguous().unsqueeze(1)
    assert fk.stride() != fv.stride(), "the case must reproduce the differing size-1 strides"
    lo, hi, nf = (torch.tensor([0], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
                  torch.ones(1, dtype=torch.int32))
    ref = R.paged_decode_attention(q.clone(), cache, pages, lo, hi, fk.clone(), fv.clone(), nf, fmt, 0.3)
    out = decode.paged_decode_attention(q, cache, pages, lo, hi, fk, fv, nf, fmt, 0.3, num_splits=2, block_n=4)
    torch.testing.assert_close(out, ref, **ATTENTION[torch.float32])
    bad = torch.randn(1, 2, h, 2 * d)[..., :d]  # strides differ on the size-2 and size-h dims: still an error
    try:
        decode.paged_decode_attention(q, cache, pages, lo, hi, torch.randn(1, 2, h, d), bad, nf, fmt, 0.3)
    except ValueError as e:
        assert "equal fp strides" in str(e)
    else:
        raise AssertionError("different strides on a size-2 dim must raise")
    print("OK decode_one_token_views")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    {"store": _case_store, "decode": _case_decode, "decode_d48": lambda: _case_decode([3]),
     "decode_raw": _case_decode_raw, "prefill": _case_prefill,
     "decode_one_token_views": _case_decode_one_token_views}[sys.argv[1]]()
