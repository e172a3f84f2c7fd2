"""One streamed OpenAI request with client-side timing (arrival, first token, every chunk, end)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestResult:
    """Timing and outcome of one request. Times are ``time.perf_counter()`` seconds.

    Attributes:
        ok: HTTP 200 and a complete stream ([DONE] seen). status: HTTP status (0 = transport error).
        chunk_times: arrival time of every content chunk (ITL = successive gaps).
        output_tokens: from the final ``usage`` chunk when the server sends it, else the content chunk count.
        expected_failure: a fault injection that is *supposed* to fail (not counted as an error).
    """

    start: float
    end: float = 0.0
    ok: bool = False
    status: int = 0
    error: str = ""
    first_token: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    offered_rate: float | None = None
    expected_failure: bool = False

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1), vLLM bench's definition; None for <2 tokens."""
        if self.first_token is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_token) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    def to_dict(self) -> dict:
        return asdict(self)


def build_body(endpoint: str, model: str, prompt: str, max_tokens: int, **extra) -> tuple[str, dict]:
    """(path, JSON body) for a streamed request with usage reporting."""
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
            "stream_options": {"include_usage": True}, **extra}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


async def stream_request(client: httpx.AsyncClient, path: str, body: dict,
                         disconnect_after_chunks: int | None = None) -> RequestResult:
    """Send one streamed request and time it.

    Args:
        client: an AsyncClient with ``base_url`` set. path/body: from :func:`build_body`.
        disconnect_after_chunks: close the connection after this many content chunks (fault injection).
    Returns:
        The filled :class:`RequestResult` (never raises for HTTP or transport errors).
    """
    r = RequestResult(start=time.perf_counter())
    try:
        async with client.stream("POST", path, json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = (await resp.aread()).decode(errors="replace")[:300]
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    r.ok = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    r.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                    r.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                for ch in chunk.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content") if "delta" in ch else ch.get("text")
                    if text:
                        now = time.perf_counter()
                        r.first_token = r.first_token or now
                        r.chunk_times.append(now)
                if disconnect_after_chunks is not None and len(r.chunk_times) >= disconnect_after_chunks:
                    r.error = "client disconnect (injected)"
                    break
            if not r.output_tokens:
                r.output_tokens = len(r.chunk_times)
            if not r.ok and not r.error:
                r.error = "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        r.end = time.perf_counter()
    return r
