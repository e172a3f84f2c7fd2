"""OpenAI-shaped errors ``{"error": {"message", "type", "param", "code"}}`` and the FastAPI handlers that map every
failure to one. Status codes: 400 malformed or invalid request, 404 unknown model or route, 405 wrong method,
413 body too large, 422 a valid request using a feature the embedded engine does not implement, 429 bounded queue
full and 503 engine unavailable (both with ``Retry-After``), 500 only for genuine internal faults."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mxserve.engine.engine import EngineUnavailable, QueueFull

log = logging.getLogger("mxserve.serve")

_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
          422: "UnprocessableEntityError", 429: "RateLimitError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error to return as-is. ``param`` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


class BodyTooLarge(Exception):
    pass


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "APIError"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def _loc(err: dict) -> str | None:
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    return ".".join(loc) or None


def install_handlers(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        msgs = "; ".join(f"{_loc(x) or 'body'}: {x.get('msg')}" for x in errs[:5])
        return error_response(400, f"invalid request: {msgs}", _loc(first))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, e: BodyTooLarge):
        return error_response(413, str(e))

    @app.exception_handler(QueueFull)
    async def _full(_: Request, e: QueueFull):
        return error_response(429, f"server busy: {e}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(EngineUnavailable)
    async def _down(_: Request, e: EngineUnavailable):
        return error_response(503, f"engine unavailable: {e}", headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("internal error")
        return error_response(500, f"internal error: {type(e).__name__}")


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for bodies over ``max_bytes`` (Content-Length or streamed chunk total)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    resp = error_response(413, f"request body exceeds {self.max_bytes} bytes")
                    return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"request body exceeds {self.max_bytes} bytes")
            return msg

        return await self.app(scope, limited, send)
