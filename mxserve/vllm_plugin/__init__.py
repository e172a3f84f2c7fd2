"""The integration seam with vLLM 0.26 (the only mxserve package that imports vllm).

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process (API server, engine
core, workers, model-inspection subprocess), so it is idempotent, cheap, and never initialises CUDA: it only
imports the config module, whose ``@register_quantization_config("mxmoe")`` decorator adds the name to
``QUANTIZATION_METHODS``.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    """Register the ``mxmoe`` quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if "mxmoe" not in QUANTIZATION_METHODS:
        import mxserve.vllm_plugin.quant_config  # noqa: F401  (the decorator registers the class)
    _registered = True
