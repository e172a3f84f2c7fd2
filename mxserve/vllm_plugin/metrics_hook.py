"""Put worker-side ``mxserve:`` metrics on vLLM's ``/metrics`` (called from ``mxserve.vllm_plugin.register()``).

Lifecycle, per vLLM process (API server, engine core, workers, model-inspection subprocess):

* every process: install a lazy context provider so side-channel snapshots carry vLLM's ``model_name``
  (``served_model_name``) and ``engine`` (data-parallel rank) labels, read from the current vLLM config the first
  time a publisher writes (publishers run during model load, under ``set_current_vllm_config``);
* process 0 only (no multiprocessing parent, i.e. the API server): set ``MXSERVE_METRICS_DIR`` to a fresh private
  temp dir if unset (forked/spawned engine and worker processes inherit it; removed at exit), and register one
  :class:`mxserve.metrics.collector.SideChannelCollector` in prometheus_client's global ``REGISTRY``, which is
  what vLLM's ``/metrics`` serves when ``PROMETHEUS_MULTIPROC_DIR`` is unset.

Never sets ``PROMETHEUS_MULTIPROC_DIR`` (that would switch ``/metrics`` to the multiprocess registry and drop
vLLM's in-memory metrics) and never touches CUDA. Idempotent and cheap (no vllm import at register time).
Limitations: with ``--api-server-count > 1`` vLLM serves a multiprocess registry and these series are absent;
Ray workers on other nodes write to their own node's directory, which this collector does not see.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import tempfile

from mxserve import envs

logger = logging.getLogger("mxserve.metrics")

_state: dict = {"registered": False, "collector": None, "owned_dir": None}


def _is_process0() -> bool:
    return multiprocessing.parent_process() is None


def _vllm_context() -> tuple[str | None, int | None]:
    """(served model name, data-parallel rank) from the current vLLM config; raises if none is set."""
    from vllm.config import get_current_vllm_config

    cfg = get_current_vllm_config()
    name = cfg.model_config.served_model_name if cfg.model_config is not None else None
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return name, int(getattr(cfg.parallel_config, "data_parallel_rank", 0) or 0)


def _per_expert() -> bool:
    fn = getattr(envs, "metrics_per_expert", None)  # MXSERVE_METRICS_PER_EXPERT (opt-in per-expert labels)
    return bool(fn()) if callable(fn) else False


def register(process0: bool | None = None) -> None:
    """Install the side channel for this process (idempotent).

    Args:
        process0: override the API-server detection (tests); default: this process has no multiprocessing parent.
    """
    if _state["registered"]:
        return
    from mxserve.metrics import sidechannel

    sidechannel.set_context_provider(_vllm_context)
    if process0 if process0 is not None else _is_process0():
        if not envs.metrics_dir():
            d = tempfile.mkdtemp(prefix="mxserve-metrics-")
            os.environ["MXSERVE_METRICS_DIR"] = d
            _state["owned_dir"] = d
            atexit.register(shutil.rmtree, d, True)
        from prometheus_client import REGISTRY

        from mxserve.metrics.collector import SideChannelCollector

        collector = SideChannelCollector(per_expert=_per_expert())
        REGISTRY.register(collector)
        _state["collector"] = collector
        logger.debug("mxserve metrics collector registered over %s", envs.metrics_dir())
    _state["registered"] = True


def unregister() -> None:
    """Remove the collector from ``REGISTRY`` (tests; a restarted in-process server)."""
    from prometheus_client import REGISTRY

    if _state["collector"] is not None:
        REGISTRY.unregister(_state["collector"])
    _state.update(registered=False, collector=None)
