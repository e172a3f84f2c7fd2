"""32 parallel streams through the official async client: every response complete, none lost or mixed up (each
equals the same prompt served alone), and the engine really batched them."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.unit.test_serve_openai import NAME, start_server

STREAMS = 32
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # fp32 KV storage keeps greedy decoding independent of batch composition (no bf16 rounding flips)
    state, srv = start_server(tmp_path_factory, max_num_seqs=STREAMS, kv_cache_dtype="fp32")
    with srv as url:
        yield state, url
    state.engine.shutdown()


def _prompt(i: int) -> str:
    return f"def f{i}(x):\n    return x * {i} +"


async def _one(client: openai.AsyncOpenAI, i: int, stream: bool) -> tuple[str, int, str]:
    kw = dict(model=NAME, prompt=_prompt(i), max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    if not stream:
        r = await client.completions.create(**kw)
        return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason
    text, usage, reason = "", None, None
    async for ch in await client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            text += ch.choices[0].text
            reason = ch.choices[0].finish_reason or reason
        if ch.usage:
            usage = ch.usage.completion_tokens
    return text, usage, reason


def test_parallel_streams_are_complete_and_unmixed(server):
    state, url = server

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
        alone = [await _one(client, i, stream=False) for i in range(STREAMS)]
        steps0 = state.engine.steps
        together = await asyncio.gather(*(_one(client, i, stream=True) for i in range(STREAMS)))
        return alone, together, state.engine.steps - steps0

    alone, together, steps = asyncio.run(main())
    assert together == alone
    assert all(u == MAX_TOKENS and r == "length" for _, u, r in together)
    assert len({t for t, _, _ in alone}) > 1               # distinct prompts give distinct outputs
    assert steps < STREAMS * MAX_TOKENS / 2                 # sequences shared forward passes
