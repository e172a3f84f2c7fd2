"""mxserve: mixed-precision MoE weights, a sub-2-bit paged KV cache and expert offloading for vLLM.

Layering: ``mxserve.vllm_plugin`` is the only package that imports vllm; everything else runs without it.
"""
__version__ = "0.1.0"
