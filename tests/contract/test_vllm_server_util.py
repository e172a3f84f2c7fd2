"""``VllmServer`` plumbing without a GPU: failure reports lead with the engine core's first ERROR lines, logs are
copied to MXSERVE_TEST_LOG_DIR, and servers start strictly one after the other."""
from __future__ import annotations

import pytest

from mxserve.vllm_plugin.server import ServerError, VllmServer, first_errors, start_sequentially

LOG = """$ vllm serve /m
INFO 11-22 08:00:00 [api_server.py:1] vLLM API server version 0.26.0
(EngineCore_DP0 pid=12) INFO 11-22 08:00:05 [core.py:1] loading
(EngineCore_DP0 pid=12) ERROR 11-22 08:00:09 [core.py:2] EngineCore failed to start.
(EngineCore_DP0 pid=12) ERROR 11-22 08:00:09 [core.py:2] Traceback (most recent call last):
(EngineCore_DP0 pid=12) ERROR 11-22 08:00:09 [core.py:2] ValueError: No available memory for the cache blocks
""" + "".join(f"INFO shutdown line {i}\n" for i in range(100)) + "RuntimeError: Engine core initialization failed\n"


def test_first_errors_and_report(tmp_path):
    assert first_errors(LOG, n=3).splitlines()[0].endswith("EngineCore failed to start.")
    assert "No available memory" in first_errors(LOG, n=3) and first_errors("INFO ok\n") == ""
    srv = VllmServer("/m", [], log_dir=str(tmp_path), label="w4")
    open(srv.log_path, "w").write(LOG)
    rep = srv.failure_report("vllm serve w4 exited with 1")
    first, tail = rep.split("--- log tail ---")
    assert "No available memory for the cache blocks" in first  # 100+ lines before the tail: only the head has it
    assert "No available memory" not in tail and "Engine core initialization failed" in tail


def test_log_copied_to_test_log_dir(tmp_path, monkeypatch):
    out = tmp_path / "keep"
    monkeypatch.setenv("MXSERVE_TEST_LOG_DIR", str(out))
    srv = VllmServer("/ckpt/w8", [], log_dir=str(tmp_path))
    srv._log = open(srv.log_path, "w")
    srv._log.write("hello\n")
    srv.stop()
    copies = list(out.iterdir())
    assert [c.read_text() for c in copies] == ["hello\n"] and copies[0].name == f"vllm-w8-{srv.port}.log"
    monkeypatch.delenv("MXSERVE_TEST_LOG_DIR")
    assert srv.copy_log() is None


def test_env_none_removes_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/x")
    srv = VllmServer("/m", [], log_dir=str(tmp_path), env={"PROMETHEUS_MULTIPROC_DIR": None, "A": "1"})
    assert "PROMETHEUS_MULTIPROC_DIR" not in srv.env and srv.env["A"] == "1" and srv.env["HF_HUB_OFFLINE"] == "1"


class _Fake:
    def __init__(self, name, events, fail=False):
        self.name, self.events, self.fail = name, events, fail

    def start(self):
        self.events.append(("start", self.name))
        return self

    def wait_healthy(self, timeout_s):
        self.events.append(("healthy?", self.name))
        if self.fail:
            raise ServerError(f"{self.name} died")

    def stop(self):
        self.events.append(("stop", self.name))


def test_start_sequentially_orders_and_cleans_up():
    ev = []
    start_sequentially([_Fake("a", ev), _Fake("b", ev)])
    assert ev == [("start", "a"), ("healthy?", "a"), ("start", "b"), ("healthy?", "b")]
    ev.clear()
    with pytest.raises(ServerError, match="b died"):
        start_sequentially([_Fake("a", ev), _Fake("b", ev, fail=True), _Fake("c", ev)])
    assert ("start", "c") not in ev and {("stop", "a"), ("stop", "b")} <= set(ev)
