"""Scaffolding for the loadtests' CPU tests: a FastAPI app with the routes every mock OpenAI server has, served by
uvicorn on a free loopback port in a daemon thread."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


def base_app():
    """FastAPI app with ``/health`` and ``/v1/models`` (one model, id ``mock``); tests add ``/v1/chat/completions``."""
    from fastapi import FastAPI
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "mock", "object": "model"}]}
    return app


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (free port) until the block ends; yields its base URL."""
    import uvicorn

    from tests.conftest import free_port
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(timeout=10)
