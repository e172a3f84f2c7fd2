"""Embedded CPU engine: a pure-torch runtime for the supported MoE architectures (bf16 or mxmoe checkpoints),
per-sequence KV caches with a pluggable quantizer, continuous batching in one engine thread, and sampling.

Used by ``mxserve serve`` when CUDA or vLLM is unavailable (or ``MXSERVE_FORCE_EMBEDDED=1``).
"""
