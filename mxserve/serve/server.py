"""Build and run the embedded server: load the checkpoint, start the engine thread, serve the app with uvicorn.

``build_state(model_dir, ...)`` does the loading; ``serve(...)`` blocks (the CLI); ``BackgroundServer`` runs it on a
thread for tests and notebooks (``with BackgroundServer(state) as url: ...``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from mxserve.engine.engine import Engine
from mxserve.engine.kv_cache import make_cache_factory
from mxserve.engine.model import MoEModel
from mxserve.serve.app import MAX_BODY_BYTES, ServerState, create_app

log = logging.getLogger("mxserve.serve")


@dataclass
class EngineOptions:
    """Embedded-engine knobs exposed by ``mxserve serve`` (defaults suit a laptop CPU)."""

    max_num_seqs: int = 16
    max_waiting: int = 64
    max_model_len: int = 2048
    max_batch_tokens: int = 512
    kv_cache_dtype: str = "auto"
    max_body_bytes: int = MAX_BODY_BYTES
    threads: int | None = None


def build_state(model_dir: str | Path, served_name: str | None = None,
                opts: EngineOptions | None = None) -> ServerState:
    """Load ``model_dir`` and start its engine.

    Returns:
        a ``ServerState`` whose engine thread is running (call ``state.engine.shutdown()`` when done).
    """
    from transformers import AutoTokenizer

    from mxserve.metrics.definitions import create_engine_metrics

    opts = opts or EngineOptions()
    if opts.threads:
        import torch
        torch.set_num_threads(opts.threads)
    model_dir = Path(model_dir)
    t0 = time.monotonic()
    model = MoEModel.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    name = served_name or model_dir.name
    registry = CollectorRegistry()
    metrics = create_engine_metrics(registry)
    for precision, nbytes in model.weight_bytes.items():
        metrics.weight_bytes.labels(model_name=name, precision=precision).set(nbytes)
    engine = Engine(model, tokenizer, max_num_seqs=opts.max_num_seqs, max_waiting=opts.max_waiting,
                    max_model_len=opts.max_model_len, max_batch_tokens=opts.max_batch_tokens,
                    kv_cache_factory=make_cache_factory(opts.kv_cache_dtype, model.kv_config), metrics=metrics, model_name=name)
    probe = model.new_cache(engine.kv_cache_factory)
    metrics.kv_cache_bits_per_element.labels(model_name=name).set(probe.bits_per_element)
    engine.start()
    log.info("loaded %s (%s) in %.1fs", model_dir, "mxmoe" if model.quantized else "bf16", time.monotonic() - t0)
    return ServerState(engine=engine, tokenizer=tokenizer, model_name=name,
                       names=frozenset({name, str(model_dir), os.path.abspath(model_dir)}), registry=registry,
                       max_body_bytes=opts.max_body_bytes)


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run uvicorn in the foreground until interrupted, then stop the engine."""
    import uvicorn
    try:
        uvicorn.run(create_app(state), host=host, port=port, log_level=log_level.lower(),
                    timeout_graceful_shutdown=5)
    finally:
        state.engine.shutdown()


class BackgroundServer:
    """uvicorn on a daemon thread (tests). ``__enter__`` returns the base URL once the socket accepts."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn
        if port is None:
            import socket
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.state = state
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
