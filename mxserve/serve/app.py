"""The FastAPI app of the embedded engine: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
``/health``, ``/metrics`` and the generated ``/openapi.json``.

Lifecycle: ``create_app(state)`` builds the app around a started ``Engine`` held by ``ServerState``; the caller
(``mxserve.serve.server``) runs it under uvicorn and shuts the engine down afterwards.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mxserve import __version__
from mxserve.engine.engine import Engine
from mxserve.serve.errors import APIError, BodyLimitMiddleware, install_handlers
from mxserve.serve.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                    CompletionResponse, ErrorResponse, ModelList)
from mxserve.serve.requests import prepare_chat, prepare_completion
from mxserve.serve.streams import Collector, Renderer

MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerState:
    """Everything the routes need. ``names`` are the model ids a request may use (served name, path)."""

    engine: Engine
    tokenizer: object
    model_name: str
    names: frozenset[str]
    registry: CollectorRegistry
    max_body_bytes: int = MAX_BODY_BYTES
    created: int = field(default_factory=lambda: int(time.time()))


_ERRORS = {s: {"model": ErrorResponse} for s in (400, 404, 413, 422, 429, 503)}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


def create_app(state: ServerState) -> FastAPI:
    """Build the app. Validation errors are 400 in OpenAI's shape (see ``mxserve.serve.errors``)."""
    app = FastAPI(title="mxserve embedded engine", version=__version__,
                  description="OpenAI-compatible API of mxserve's embedded CPU engine")
    app.state.mx = state
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_body_bytes)
    eng = state.engine
    spec = eng.model.spec

    def check_model(name: str) -> None:
        if name not in state.names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> Response:
        if not eng.alive:
            raise APIError(503, f"engine not running: {eng.failed or 'stopped'}", headers={"Retry-After": "1"})
        return Response(status_code=200)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "mxserve", "root": state.model_name,
                                            "max_model_len": eng.max_model_len}]}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    async def run(prep, chat: bool, request: Request):
        need, cap = len(prep.prompts) * prep.n, eng.max_num_seqs + eng.max_waiting
        if need > cap:  # could never be admitted: a client error, not a busy server
            raise APIError(400, f"request needs {need} sequences (prompts x n); this server holds at most {cap}",
                           "n")
        col = Collector(eng, prep, uuid.uuid4().hex)
        col.submit()
        r = Renderer(chat, state.model_name, state.tokenizer, prep)
        if prep.stream:
            return StreamingResponse(r.stream(col), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await r.whole(col, request))
        except ConnectionAbortedError:
            return Response(status_code=499)
        finally:
            if col.remaining:
                col.abort()

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM}})
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        return await run(prepare_completion(req, state.tokenizer, spec.vocab, eng.max_model_len), False, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM}})
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        return await run(prepare_chat(req, state.tokenizer, spec.vocab, eng.max_model_len), True, request)

    _document_400(app)
    return app


def _document_400(app: FastAPI) -> None:
    """Replace FastAPI's default 422 validation response in the schema with our 400 (what the handler returns)."""
    orig = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = orig()
        for path in schema.get("paths", {}).values():
            for op in path.values():
                resp = op.get("responses", {})
                if "422" in resp and "HTTPValidationError" in str(resp["422"]):
                    resp["422"] = {"description": "Valid request using a feature this engine does not implement",
                                   "content": {"application/json": {"schema": {
                                       "$ref": "#/components/schemas/ErrorResponse"}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
