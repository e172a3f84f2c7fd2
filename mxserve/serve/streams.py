"""Bridge engine outputs (engine thread) to asyncio, and render OpenAI completion / chat payloads, streamed (SSE)
or whole. A request whose client goes away is aborted in the engine at once (``finally`` of every path)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import Request

from mxserve.engine.engine import Engine, SeqOutput
from mxserve.engine.sampling import Sampled
from mxserve.serve.errors import APIError, error_body
from mxserve.serve.requests import Prepared

DISCONNECT_POLL_S = 0.25


class Collector:
    """Submits one prepared API request (several prompts x n choices) and yields ``(choice_index, SeqOutput)``."""

    def __init__(self, engine: Engine, prep: Prepared, request_id: str):
        self.engine, self.prep = engine, prep
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[SeqOutput] = asyncio.Queue()
        self.sub = {f"{request_id}-{i}": i for i in range(len(prep.prompts))}
        self.remaining = len(prep.prompts) * prep.n
        self.completion_tokens = 0

    def _callback(self, out: SeqOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # event loop closed: the server is going away
            pass

    def submit(self) -> None:
        done = []
        try:
            for sid, i in self.sub.items():
                self.engine.submit(sid, self.prep.prompts[i], self.prep.params, self.prep.n, self._callback)
                done.append(sid)
        except BaseException:
            for sid in done:
                self.engine.abort(sid)
            raise

    def abort(self) -> None:
        for sid in self.sub:
            self.engine.abort(sid)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prep.prompts)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def outputs(self, request: Request | None = None) -> AsyncIterator[tuple[int, SeqOutput]]:
        """Outputs until every choice finished; polls ``request`` for a disconnect while waiting (non-streamed
        responses; a streamed response notices the disconnect itself and closes this iterator)."""
        getter: asyncio.Future | None = None
        try:
            while self.remaining:
                if request is None:
                    out = await self.queue.get()
                else:
                    getter = getter or asyncio.ensure_future(self.queue.get())
                    done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                    if not done:
                        if await request.is_disconnected():
                            raise ConnectionAbortedError("client disconnected")
                        continue
                    out, getter = getter.result(), None
                if out.finish_reason is not None:
                    self.remaining -= 1
                    self.completion_tokens += out.completion_tokens
                yield self.sub[out.request_id] * self.prep.n + out.index, out
        finally:
            if getter is not None:
                getter.cancel()


def _tok(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid])


def completion_logprobs(tokenizer, items: list[Sampled], offset: int) -> dict:
    toks = [_tok(tokenizer, s.token) for s in items]
    offs, o = [], offset
    for t in toks:
        offs.append(o)
        o += len(t)
    return {"tokens": toks, "token_logprobs": [s.logprob for s in items],
            "top_logprobs": [{_tok(tokenizer, i): lp for i, lp in s.top} for s in items], "text_offset": offs}


def chat_logprobs(tokenizer, items: list[Sampled]) -> dict:
    def entry(tid: int, lp: float) -> dict:
        t = _tok(tokenizer, tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
    return {"content": [dict(entry(s.token, s.logprob), top_logprobs=[entry(i, lp) for i, lp in s.top])
                        for s in items]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Renderer:
    """Builds payloads for one API request. ``chat`` selects chat.completion(.chunk) vs text_completion."""

    def __init__(self, chat: bool, model: str, tokenizer, prep: Prepared):
        self.chat, self.model, self.tok, self.prep = chat, model, tokenizer, prep
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    async def whole(self, col: Collector, request: Request) -> dict:
        n = len(self.prep.prompts) * self.prep.n
        text, lps, reason = [""] * n, [[] for _ in range(n)], [None] * n
        async for idx, out in col.outputs(request):
            if out.finish_reason == "error":
                raise APIError(500, f"generation failed: {out.error}")
            text[idx] += out.text
            lps[idx] += out.logprobs
            reason[idx] = out.finish_reason
        want_lp = self.prep.logprobs is not None
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text[i]},
                        "logprobs": chat_logprobs(self.tok, lps[i]) if want_lp else None,
                        "finish_reason": reason[i]} for i in range(n)]
            return dict(self._head("chat.completion"), choices=choices, usage=col.usage())
        choices = [{"index": i, "text": text[i], "finish_reason": reason[i],
                    "logprobs": completion_logprobs(self.tok, lps[i], 0) if want_lp else None} for i in range(n)]
        return dict(self._head("text_completion"), choices=choices, usage=col.usage())

    async def stream(self, col: Collector) -> AsyncIterator[str]:
        """SSE events; ``finally`` aborts the engine request if the client left before the end."""
        n = len(self.prep.prompts) * self.prep.n
        usage_field = {"usage": None} if self.prep.include_usage else {}
        offsets = [0] * n
        want_lp = self.prep.logprobs is not None
        try:
            if self.chat:
                for i in range(n):
                    yield _sse(dict(self._head("chat.completion.chunk"), **usage_field, choices=[
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]))
            async for idx, out in col.outputs():
                if out.finish_reason == "error":
                    yield _sse(error_body(500, f"generation failed: {out.error}"))
                    continue
                if not (out.text or out.finish_reason or out.logprobs):
                    continue
                if self.chat:
                    choice = {"index": idx, "delta": {"content": out.text} if out.text else {},
                              "logprobs": chat_logprobs(self.tok, out.logprobs) if want_lp else None,
                              "finish_reason": out.finish_reason}
                    yield _sse(dict(self._head("chat.completion.chunk"), **usage_field, choices=[choice]))
                else:
                    lp = completion_logprobs(self.tok, out.logprobs, offsets[idx]) if want_lp else None
                    offsets[idx] += len(out.text)
                    choice = {"index": idx, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}
                    yield _sse(dict(self._head("text_completion"), **usage_field, choices=[choice]))
            if self.prep.include_usage:
                obj = "chat.completion.chunk" if self.chat else "text_completion"
                yield _sse(dict(self._head(obj), choices=[], usage=col.usage()))
            yield "data: [DONE]\n\n"
        finally:
            if col.remaining:
                col.abort()
