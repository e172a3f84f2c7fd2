"""Offline MoE weight quantization (no vLLM imports; CPU-testable): RTN / GPTQ / nested MWQ quantizers, router
statistics, per-block sensitivity, the exact MILP bit allocator and the checkpoint-level driver (``api``)."""
