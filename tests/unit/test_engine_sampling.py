"""Sampler (greedy, top-p support, seeded reproducibility, logprobs), stop-string detokenizer, KV-cache storage."""
from __future__ import annotations

import pytest
import torch

from mxserve.engine.detok import StopChecker
from mxserve.engine.kv_cache import KVCache, make_cache_factory
from mxserve.engine.sampling import SamplingParams, sample, top_p_filter
from tests.tolerances import ATTENTION, BIT_EXACT, GEMM


def test_greedy_and_logprobs():
    logits = torch.randn(50)
    s = sample(logits, SamplingParams(temperature=0, logprobs=5), None)
    ref = torch.log_softmax(logits, -1)
    assert s.token == int(logits.argmax())
    assert [i for i, _ in s.top] == torch.topk(ref, 5).indices.tolist()
    torch.testing.assert_close(torch.tensor(s.logprob), ref.max(), **GEMM[torch.float32])


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.1)).sum() == 1
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(i)).token
             for i in range(200)}
    assert draws == {0, 1}


def test_seeded_sampling_reproducible():
    logits = torch.randn(100)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, p, g).token for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
    b = [sample(logits, p, g).token for g in [torch.Generator().manual_seed(7)] for _ in range(20)]
    assert a == b and len(set(a)) > 1


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(top_p=0.0), dict(temperature=-1.0), dict(logprobs=21),
                                 dict(stop=("",))])
def test_sampling_params_validation(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


class _CharTok:
    """One token per character (ids are code points): isolates StopChecker from BPE merges."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def test_stop_checker_streams_everything_before_the_stop():
    text = "hello world, stop here"
    sc = StopChecker(_CharTok(), ("stop",))
    out, hit = "", False
    for i in range(1, len(text) + 1):
        delta, hit = sc.update([ord(c) for c in text[:i]], final=False)
        out += delta
        if hit:
            break
    assert hit and out == "hello world, "
    sc = StopChecker(_CharTok(), ("xyz",))
    streamed = "".join(sc.update([ord(c) for c in text[:i]], final=i == len(text))[0] for i in range(1, len(text) + 1))
    assert streamed == text


@pytest.mark.parametrize("kind", ["bf16", "fp32"])
def test_plain_kv_cache_round_trip(kind):
    cache: KVCache = make_cache_factory(kind)(2, 2, 16, torch.float32)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    cache.append(0, k[:3], v[:3])
    kk, vv = cache.append(0, k[3:], v[3:])
    assert kk.shape == (5, 2, 16) and len(cache) == 5 and cache.nbytes() == 5 * 2 * 2 * 16 * cache.bits_per_element / 8
    want = k if kind == "fp32" else k.bfloat16().float()
    torch.testing.assert_close(kk, want, **BIT_EXACT)


def _chunks(cache, q, k, v, cuts):
    outs, start = [], 0
    for end in cuts:
        outs.append(cache.attend(0, q[start:end], k[start:end], v[start:end], torch.arange(start, end), 0.25))
        start = end
    return torch.cat(outs)


@pytest.mark.parametrize("kind", ["int8", "int4", "int2"])
def test_mxkv_cache_matches_reference_runtime(kind):
    """The engine's adapter == the KV reference runtime driven directly; prefill chunk is exact (FP)."""
    from mxserve.kvcache.config import KVQuantConfig
    from mxserve_kernels.attention.reference import QuantizedKVCache
    q, k, v = torch.randn(40, 4, 16), torch.randn(40, 2, 16), torch.randn(40, 2, 16)
    cache = make_cache_factory(kind)(1, 2, 16, torch.float32)
    got = _chunks(cache, q, k, v, [8] + list(range(9, 41)))
    bits = int(kind[3:])
    ref = QuantizedKVCache(KVQuantConfig.uniform(1, bits, bits, 16, 16).layer(0).slot_format(16), 2)
    want = []
    for a, z in zip([0, 8] + list(range(9, 40)), [8] + list(range(9, 41))):
        ref.append("s", k[a:z], v[a:z])
        want.append(ref.attend("s", q[a:z], 0.25))
    torch.testing.assert_close(got, torch.cat(want), **BIT_EXACT)
    exact = _chunks(make_cache_factory("fp32")(1, 2, 16, torch.float32), q, k, v, [8])
    torch.testing.assert_close(got[:8], exact, **ATTENTION[torch.float32])
    assert cache.bits_per_element < 16 and len(cache) == 40
