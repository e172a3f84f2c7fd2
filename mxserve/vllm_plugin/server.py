"""Start / stop a ``vllm serve`` subprocess (GPU tests, benchmarks): free port, log file, /health wait, clean kill.

Usage::

    with VllmServer(model_dir, ["-q", "mxmoe", "--max-model-len", "512"], log_dir=tmp) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message carries the tail of its log."""


class VllmServer:
    """A ``vllm serve MODEL ARGS`` subprocess.

    Args:
        model: checkpoint directory. args: extra CLI arguments. log_dir: where ``vllm-<port>.log`` goes.
        served_name: ``--served-model-name``. env: extra environment variables.
    """

    def __init__(self, model: str, args: list[str], *, log_dir: str, served_name: str = "m",
                 env: dict[str, str] | None = None) -> None:
        self.model, self.args, self.served_name = str(model), list(args), served_name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(str(log_dir), f"vllm-{self.port}.log")
        self.env = {**os.environ, **DEFAULT_ENV, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VllmServer":
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", self.model, "--port", str(self.port),
               "--host", "127.0.0.1", "--served-model-name", self.served_name, *self.args]
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float = 300.0) -> "VllmServer":
        """Poll /health until 200; ServerError with the log tail if the process dies or the timeout passes."""
        assert self.proc is not None, "start() first"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vllm serve exited with {self.proc.returncode}; log {self.log_path}:\n"
                                  f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        raise ServerError(f"vllm serve not healthy after {timeout_s:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    def wait_exit(self, timeout_s: float = 300.0) -> int:
        """Wait for the process to exit by itself (expected-failure tests); returns its exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise ServerError(f"vllm serve still running after {timeout_s:.0f}s") from None

    def stop(self) -> None:
        """SIGTERM the process group (API server + engine core + workers), SIGKILL after 20 s."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            return self.wait_healthy()
        except Exception:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
