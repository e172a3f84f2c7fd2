"""The integration seam with vLLM 0.26 (the only mxserve package that imports vllm).

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process (API server, engine
core, workers, model-inspection subprocess), so it is idempotent, cheap, and never initialises CUDA. It imports
each registration module below and calls its ``register()`` if it has one:

* ``quant_config``: ``@register_quantization_config("mxmoe")`` adds the name to ``QUANTIZATION_METHODS``;
* ``kv.backend``: the quantized-KV attention backend (per-process override dict, so it must run in workers);
* ``metrics_hook``: the API-server collector for worker-side metrics.
"""
from __future__ import annotations

import importlib
import logging

logger = logging.getLogger("mxserve")

_registered = False
_MODULES = ("mxserve.vllm_plugin.quant_config", "mxserve.vllm_plugin.kv.backend", "mxserve.vllm_plugin.metrics_hook")


def register() -> None:
    """Register mxserve with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name or (e.name and name.startswith(e.name + ".")):
                continue  # optional part not in this build
            raise
        fn = getattr(mod, "register", None)
        if callable(fn):
            fn()
    _registered = True
