"""The embedded server through the official ``openai`` client: streaming == non-streaming at temperature 0, usage,
stop sequences, n/seed, logprobs, error mapping, metrics. CPU, tiny random Qwen3-MoE."""
from __future__ import annotations

import json
import pathlib
import time

import httpx
import openai
import pytest
import torch

from mxserve.engine.kv_cache import make_cache_factory
from mxserve.serve.server import BackgroundServer, EngineOptions, build_state
from tests.tolerances import GEMM

NAME = "tiny-qwen3"


def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random Qwen3-MoE + tokenizer, built once per test session (shared by the test_serve_* files)."""
    from mxserve.models.tiny import make_tiny
    d = tmp_path_factory.getbasetemp() / "serve-tiny-qwen3"
    if not (d / "config.json").exists():
        make_tiny("qwen3_moe", d, layers=2, experts=4, top_k=2, hidden=64, inter=32, vocab=512, heads=4,
                  kv_heads=2, head_dim=16, force=True)
    return d


def start_server(tmp_path_factory, **opts):
    """(state, BackgroundServer) for the tiny model; caller enters the server and shuts the engine down."""
    state = build_state(tiny_model_dir(tmp_path_factory), NAME, EngineOptions(**{"max_model_len": 256, **opts}))
    return state, BackgroundServer(state)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state, srv = start_server(tmp_path_factory, max_num_seqs=8)
    with srv as url:
        yield state, url
    state.engine.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="EMPTY", max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server[1] + "/health").status_code == 200
    paths = httpx.get(server[1] + "/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(paths)


@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_non_stream_greedy(client, chat):
    kw = dict(model=NAME, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        kw["messages"] = [{"role": "user", "content": "def fib(n):"}]
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        ref = whole.choices[0].message.content
    else:
        kw["prompt"] = "import numpy as"
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        ref = whole.choices[0].text
    assert text == ref
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason == "length" and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.completion_tokens == 12


def test_usage_counts_tokens(server, client):
    state, _ = server
    prompt = "class Foo(object):\n    pass"
    r = client.completions.create(model=NAME, prompt=[prompt, "x = 1"], max_tokens=5, n=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    n_prompt = len(state.tokenizer.encode(prompt, add_special_tokens=False)) + \
        len(state.tokenizer.encode("x = 1", add_special_tokens=False))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 4 * 5 and r.usage.total_tokens == n_prompt + 20
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]


def test_stop_sequence_truncates(client):
    kw = dict(model=NAME, prompt="def main():", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in
                full[i:i + 2])
    expect = full[:full.find(stop)]
    for stream in (False, True):
        r = client.completions.create(**kw, stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(r)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == expect and reason == "stop"


def test_n_with_seed_is_reproducible(client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=8, n=3, temperature=1.0,
              seed=1234)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # choices use different streams (seed + i)
    greedy = client.chat.completions.create(**dict(kw, temperature=0, seed=None))
    assert len({c.message.content for c in greedy.choices}) == 1


def test_logprobs_match_model(server, client):
    state, _ = server
    prompt = "for i in range"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    model = state.engine.model
    ids = torch.tensor(state.tokenizer.encode(prompt, add_special_tokens=False))
    cache = model.new_cache(make_cache_factory("bf16"))
    ref = torch.log_softmax(model.logits(model.forward(ids, torch.arange(len(ids)), [(0, len(ids))], [cache])), -1)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[0]), ref[0].max(), **GEMM[torch.float32])
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy = top-1
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=2, logprobs=21)
    assert client.completions.create(model=NAME, prompt=prompt, max_tokens=2).choices[0].finish_reason


def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_error_mapping(server, client):
    url = server[1]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    assert _err(httpx.post(url + "/v1/completions", content=b"{not json",
                           headers={"content-type": "application/json"}), 400)
    assert _err(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x", "temperature": -1}),
                400)["param"] == "temperature"
    assert _err(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [1, 10 ** 6]}),
                400)["param"] == "prompt"
    assert _err(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 10 ** 6}),
                400)["param"] == "max_tokens"
    assert _err(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x", "stream_options": {}}),
                400)["param"] == "stream_options"
    assert _err(httpx.post(url + "/v1/completions", json=[1, 2]), 400)
    assert _err(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": ["a"] * 32, "n": 16}),
                400)["param"] == "n"                                      # more sequences than the server holds
    assert _err(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x", "echo": True}),
                422)["param"] == "echo"
    big = json.dumps({"model": NAME, "prompt": "x" * (2 << 20)})
    assert _err(httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"}),
                413)
    assert _err(httpx.get(url + "/v1/nothing"), 404)
    assert _err(httpx.get(url + "/v1/completions"), 405)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=NAME, prompt="x", presence_penalty=1.0)


def test_metrics_exposed(server, client):
    client.completions.create(model=NAME, prompt="a", max_tokens=3, extra_body={"ignore_eos": True})
    from prometheus_client.parser import text_string_to_metric_families
    lab = (("model_name", NAME),)
    kv_lab = lab + (("precision", "bf16"),)
    deadline = time.monotonic() + 10
    while True:  # gauges are refreshed by the engine thread right after the step that finished the request
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in
                   text_string_to_metric_families(httpx.get(server[1] + "/metrics").text) for s in f.samples}
        if samples[("mxserve:num_requests_running", lab)] == samples.get(("mxserve:kv_cache_bytes", kv_lab)) == 0 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert samples[("mxserve:time_to_first_token_seconds_count", lab)] >= 1
    assert samples[("mxserve:inter_token_latency_seconds_count", lab)] >= 2
    assert samples[("mxserve:generation_tokens_total", lab)] >= 3
    assert samples[("mxserve:weight_bytes", lab + (("precision", "bf16"),))] > 0
    assert samples[("mxserve:kv_cache_bits_per_element", lab)] == 16
    assert samples[("mxserve:num_requests_waiting", lab)] == 0
    assert samples[("mxserve:num_requests_running", lab)] == 0 and samples[("mxserve:kv_cache_bytes", kv_lab)] == 0
    assert samples[("mxserve:requests_total", (("finished_reason", "length"),) + lab)] >= 1
