"""Bounded queue (429 + Retry-After), engine down (503 + Retry-After), client disconnect frees its slot at once,
and a bounded schemathesis run against /openapi.json with no 5xx."""
from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from mxserve.serve.app import create_app
from tests.unit.test_serve_openai import NAME, start_server

LONG = {"model": NAME, "prompt": "while True:", "max_tokens": 4000, "stream": True, "ignore_eos": True}


def _wait(pred, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_queue_full_429_then_disconnect_frees_slot(tmp_path_factory):
    state, srv = start_server(tmp_path_factory, max_num_seqs=1, max_waiting=1, max_model_len=4096)
    eng = state.engine
    try:
        with srv as url, httpx.Client(base_url=url, timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=LONG) as first:
                assert first.status_code == 200
                lines = first.iter_lines()                     # keep a reference: a dropped iterator closes
                next(lines)                                    # first is running
                eng.pause()                                    # freeze scheduling: nothing finishes or starts
                with c.stream("POST", "/v1/completions", json=LONG) as second:
                    assert second.status_code == 200           # second waits in the queue
                    assert _wait(lambda: eng.counts() == (1, 1)), eng.counts()
                    r = c.post("/v1/completions", json=dict(LONG, stream=False))
                    assert r.status_code == 429 and r.headers["Retry-After"].isdigit()
                    assert r.json()["error"]["type"] == "RateLimitError"
            # both clients closed mid-stream: their sequences leave the engine (aborts apply even while paused)
            assert _wait(lambda: eng.counts() == (0, 0), timeout=5.0), eng.counts()
            eng.pause(False)
            metrics = c.get("/metrics").text
            assert 'mxserve:requests_total{finished_reason="abort",model_name="tiny-qwen3"} 2.0' in metrics
            r = c.post("/v1/completions", json=dict(LONG, stream=False, max_tokens=2))
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        eng.shutdown()
    # engine stopped: 503 + Retry-After on generation and /health
    with srv.__class__(state) as url2:
        r = httpx.post(url2 + "/v1/completions", json={"model": NAME, "prompt": "x"})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert httpx.get(url2 + "/health").status_code == 503


@pytest.fixture(scope="module")
def api_state(tmp_path_factory):
    state, _ = start_server(tmp_path_factory, max_num_seqs=4, max_model_len=48)
    yield state
    state.engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(api_state):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(api_state))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_fuzz_no_5xx(case):
    case.call_and_validate(checks=[not_a_server_error])
