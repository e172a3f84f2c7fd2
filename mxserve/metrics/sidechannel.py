"""Worker -> API-server side channel for worker-side metrics (vLLM workers have no path to ``/metrics``).

Why: inside ``vllm serve`` the expert cache, offload engine and KV cache live in worker processes, but only the
API-server process (process 0) serves ``/metrics``. Setting ``PROMETHEUS_MULTIPROC_DIR`` late would drop vLLM's
own metrics (../shared/docs/vllm-0.26.md §6), so workers instead write a small JSON snapshot per pid into
``MXSERVE_METRICS_DIR`` (set by the plugin in process 0 and inherited by every child), and a Collector in
process 0 (:mod:`mxserve.metrics.collector`) aggregates the snapshots at scrape time.

Publisher API (the only thing other modules need)::

    from mxserve.metrics import sidechannel
    sidechannel.publish("offload", {                      # section: your component's name
        "expert_cache_hits": 1234,                        # counters: CUMULATIVE totals since process start
        "expert_cache_misses": {"3/17": 5, "3/2": 1},     # per-expert: keys "layer/expert" (summed unless
                                                          #   per-expert series are enabled)
        "expert_h2d_bytes": 9_437_184,
        "resident_planes": {"2": 40, "3": 8, "4": 16},    # one extra label: key = label value (here: bits)
    })
    sidechannel.publish("quant", {"weight_bytes": {"int2": 1.2e9, "bf16": 3e8},
                                  "quant_config": {"weight_bits_mix": "2:0.7,4:0.3", "kv_bits": "2",
                                                   "offload": "on", "scheme": "nested"}})   # info: label -> str
    sidechannel.configure(model_name="Qwen/Qwen3-30B-A3B", engine=0)   # once per worker, if known

Rules for publishers:
  * keys are the keys of :data:`mxserve.metrics.definitions.WORKER_METRICS`; anything else raises ValueError;
  * values are plain Python numbers (call ``.item()`` / ``.tolist()`` on tensors *outside* CUDA-graph capture);
  * counters are cumulative totals owned by the publisher (not increments), so a lost write loses nothing;
  * each section replaces its own previous values; sections never overwrite each other;
  * publishing is cheap: it updates a dict and writes the file at most every ``min_interval_s`` seconds
    (default 1 s); call :func:`flush` to force a write (e.g. at shutdown; an ``atexit`` hook does it too).

Snapshot file: ``<dir>/<pid>.json`` = ``{"pid", "time", "model_name", "engine", "sections": {section: values}}``,
written to a temp file then renamed (atomic). Readers drop snapshots of dead pids or older than ``stale_after_s``.
Limitation: pids are checked on this host, so Ray workers on other nodes are not seen.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
import time
from typing import Any, Callable

from mxserve import envs
from mxserve.metrics.definitions import WORKER_METRICS

logger = logging.getLogger("mxserve.metrics")

Values = dict[str, Any]
_lock = threading.Lock()
_state: dict[str, Any] = {"sections": {}, "model_name": None, "engine": None, "last_write": 0.0, "dirty": False}
_context_provider: Callable[[], tuple[str | None, int | None]] | None = None
_atexit_registered = False
MIN_INTERVAL_S = 1.0


def validate(section: str, values: Values) -> Values:
    """Check one ``publish`` payload; returns a JSON-safe copy.

    Raises:
        ValueError: naming the section and key for an unknown key or a value of the wrong shape.
    """
    if not isinstance(section, str) or not section:
        raise ValueError(f"sidechannel.publish: section must be a non-empty str, got {section!r}")
    out: Values = {}
    for key, v in values.items():
        spec = WORKER_METRICS.get(key)
        where = f"sidechannel.publish({section!r}): key {key!r}"
        if spec is None:
            raise ValueError(f"{where} is not a worker metric; known keys: {sorted(WORKER_METRICS)}")
        extra = spec.labels[2:]  # after model_name, engine
        if spec.kind == "info":
            if not isinstance(v, dict) or set(v) != set(extra) or not all(isinstance(x, str) for x in v.values()):
                raise ValueError(f"{where}: info metric needs a dict of str values with exactly the labels {extra}")
            out[key] = dict(v)
        elif isinstance(v, dict):
            if not extra and not spec.per_expert_labels:
                raise ValueError(f"{where}: metric has no extra labels, pass a number")
            for lk, x in v.items():
                if spec.per_expert_labels and not extra and len(str(lk).split("/")) != 2:
                    raise ValueError(f"{where}: per-expert keys must be 'layer/expert', got {lk!r}")
                _number(where, x)
            out[key] = {str(lk): float(x) for lk, x in v.items()}
        else:
            if extra:
                raise ValueError(f"{where}: metric has labels {extra}, pass a dict label value -> number")
            out[key] = float(_number(where, v))
    return out


def _number(where: str, x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{where}: value must be a Python int/float, got {type(x).__name__}")
    if x != x or x < 0:
        raise ValueError(f"{where}: value must be a non-negative finite number, got {x}")
    return x


def configure(model_name: str | None = None, engine: int | None = None) -> None:
    """Set the ``model_name`` / ``engine`` labels of this process's snapshot (once per worker)."""
    with _lock:
        if model_name is not None:
            _state["model_name"] = str(model_name)
        if engine is not None:
            _state["engine"] = int(engine)


def set_context_provider(fn: Callable[[], tuple[str | None, int | None]] | None) -> None:
    """Register a callable returning ``(model_name, engine)``, asked lazily at write time when :func:`configure`
    was not called (the vLLM plugin installs one that reads the current vLLM config)."""
    global _context_provider
    _context_provider = fn


def publish(section: str, values: Values, min_interval_s: float | None = None) -> None:
    """Replace ``section``'s values in this process's snapshot and write it if due.

    Args:
        section: publisher name, e.g. ``"offload"``, ``"kv"``, ``"quant"``.
        values: metric key -> number | {label value: number} | {label: str} (info); see the module docstring.
        min_interval_s: write at most this often (seconds); default ``MIN_INTERVAL_S``.
    """
    clean = validate(section, values)
    global _atexit_registered
    with _lock:
        _state["sections"][section] = clean
        _state["dirty"] = True
        if not _atexit_registered:
            atexit.register(flush)
            _atexit_registered = True
        due = time.monotonic() - _state["last_write"] >= (MIN_INTERVAL_S if min_interval_s is None else min_interval_s)
    if due:
        flush()


def local_snapshot() -> dict[str, Any]:
    """This process's current snapshot (what :func:`flush` writes)."""
    with _lock:
        model_name, engine = _state["model_name"], _state["engine"]
        sections = json.loads(json.dumps(_state["sections"]))
    if sections and (model_name is None or engine is None) and _context_provider is not None:
        try:
            pm, pe = _context_provider()
        except Exception as e:  # the provider reads vLLM state that may not exist yet: label later
            logger.debug("metrics context provider failed: %s", e)
            pm, pe = None, None
        model_name = model_name if model_name is not None else pm
        engine = engine if engine is not None else pe
        configure(model_name, engine)  # remember: the vLLM config is only current during model load
    return {"pid": os.getpid(), "time": time.time(), "model_name": model_name or "",
            "engine": 0 if engine is None else engine, "sections": sections}


def flush(directory: str | None = None) -> str | None:
    """Write this process's snapshot atomically to ``<dir>/<pid>.json``.

    Args:
        directory: target dir; default ``MXSERVE_METRICS_DIR``. Nothing is written when neither is set.
    Returns:
        The written path, or None.
    """
    directory = directory or envs.metrics_dir()
    if not directory or not _state["sections"]:
        return None
    snap = local_snapshot()
    path = os.path.join(directory, f"{snap['pid']}.json")
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{snap['pid']}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, path)
    except OSError as e:  # metrics must never take the worker down
        logger.warning("mxserve metrics: cannot write snapshot %s: %s", path, e)
        return None
    with _lock:
        _state["last_write"] = time.monotonic()
        _state["dirty"] = False
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_snapshots(directory: str, stale_after_s: float = 600.0, remove_dead: bool = True) -> list[dict]:
    """Read every live, fresh snapshot in ``directory``.

    Args:
        directory: the ``MXSERVE_METRICS_DIR``.
        stale_after_s: snapshots older than this are skipped (an idle worker keeps its last write alive until then).
        remove_dead: delete files whose pid no longer exists.
    Returns:
        Snapshot dicts (see module docstring), one per live pid. Unreadable files are skipped with a warning.
    """
    out: list[dict] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    now = time.time()
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        try:
            pid = int(name[:-5])
        except ValueError:
            continue
        if not _pid_alive(pid):
            if remove_dead:
                try:
                    os.remove(path)
                except OSError:
                    pass
            continue
        try:
            with open(path) as f:
                snap = json.load(f)
        except (OSError, ValueError) as e:
            logger.warning("mxserve metrics: skipping unreadable snapshot %s: %s", path, e)
            continue
        if now - float(snap.get("time", 0)) > stale_after_s:
            continue
        out.append(snap)
    return out


def _reset_for_tests() -> None:
    with _lock:
        _state.update(sections={}, model_name=None, engine=None, last_write=0.0, dirty=False)
    set_context_provider(None)
