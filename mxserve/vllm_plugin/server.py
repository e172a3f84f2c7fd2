"""Start / stop a ``vllm serve`` subprocess (GPU tests, benchmarks): free port, log file, /health wait, clean kill.

Failures (:class:`ServerError`) show the first ERROR lines of the log (the engine core's root cause: vLLM's API
server prints only "Engine core initialization failed" at the end) followed by the log tail. When
``MXSERVE_TEST_LOG_DIR`` is set, the log is copied there on ``stop()`` (GPU sessions bring it back in ``$OUT``).
Servers of one test module must start one after the other (:func:`start_sequentially`): vLLM's memory profiling
attributes another process's growth to itself ("No available memory for the cache blocks").

Usage::

    with VllmServer(model_dir, ["-q", "mxmoe", "--max-model-len", "512"], log_dir=tmp) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from mxserve import envs

DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message carries its first ERROR lines and its log tail."""


_ERROR_RE = re.compile(r"\bERROR\b|Traceback|Error: |Exception: ")


def first_errors(text: str, n: int = 40) -> str:
    """The first ``n`` lines of ``text`` from its first ERROR / Traceback line on ('' when there is none)."""
    lines = text.splitlines(True)
    for i, line in enumerate(lines):
        if _ERROR_RE.search(line):
            return "".join(lines[i:i + n])
    return ""


def log_dir_for_tests() -> str | None:
    """``MXSERVE_TEST_LOG_DIR``: where server logs are copied (None when unset)."""
    fn = getattr(envs, "test_log_dir", None)
    return fn() if callable(fn) else (os.environ.get("MXSERVE_TEST_LOG_DIR") or None)


class VllmServer:
    """A ``vllm serve MODEL ARGS`` subprocess.

    Args:
        model: checkpoint directory. args: extra CLI arguments. log_dir: where ``vllm-<port>.log`` goes.
        served_name: ``--served-model-name``. env: extra environment variables (a None value removes the variable).
        label: short name for messages and the copied log (default: the model directory's name).
    """

    def __init__(self, model: str, args: list[str], *, log_dir: str, served_name: str = "m",
                 env: dict[str, str] | None = None, label: str | None = None) -> None:
        self.model, self.args, self.served_name = str(model), list(args), served_name
        self.label = label or os.path.basename(self.model.rstrip("/")) or "model"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(str(log_dir), f"vllm-{self.port}.log")
        merged = {**os.environ, **DEFAULT_ENV, **(env or {})}
        self.env = {k: v for k, v in merged.items() if v is not None}  # env={"X": None} removes X
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

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "".join(self.log_text().splitlines(True)[-n:])

    def failure_report(self, what: str) -> str:
        """``what`` + the first ERROR lines + the log tail (the ServerError message)."""
        text = self.log_text()
        errs = first_errors(text)
        tail = "".join(text.splitlines(True)[-60:])
        return (f"{what}; log {self.log_path}\n--- first errors ---\n{errs or '(no ERROR line)'}\n"
                f"--- log tail ---\n{tail}")

    def wait_healthy(self, timeout_s: float = 300.0) -> "VllmServer":
        """Poll /health until 200; ServerError with the log tail if the process dies or the timeout passes."""
        assert self.proc is not None, "start() first"
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(self.failure_report(f"vllm serve {self.label} exited with {self.proc.returncode}"))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        raise ServerError(self.failure_report(f"vllm serve {self.label} not healthy after {timeout_s:.0f}s"))

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
            self.copy_log()

    def copy_log(self) -> str | None:
        """Copy the log to ``MXSERVE_TEST_LOG_DIR`` as ``vllm-<label>-<port>.log``; returns the copy's path."""
        d = log_dir_for_tests()
        if not d or not os.path.exists(self.log_path):
            return None
        os.makedirs(d, exist_ok=True)
        dst = os.path.join(d, f"vllm-{self.label}-{self.port}.log")
        shutil.copyfile(self.log_path, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
        return dst

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            return self.wait_healthy()
        except Exception:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def start_sequentially(servers: list[VllmServer], timeout_s: float = 300.0) -> list[VllmServer]:
    """Start each server and wait until it is healthy before starting the next (vLLM's memory profiling assumes it
    owns the GPU while it profiles). On a failure every started server is stopped and the ServerError re-raised."""
    started: list[VllmServer] = []
    try:
        for s in servers:
            started.append(s.start())
            s.wait_healthy(timeout_s)
    except BaseException:
        for s in started:
            s.stop()
        raise
    return servers
