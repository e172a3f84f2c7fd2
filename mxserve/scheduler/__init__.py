"""Expert offloading with nested weights: pure policy (plan) + transfer engine (execute).

``config.OffloadConfig`` (the ``quantization_config["offload"]`` section), ``layout.PlaneLayout`` (plane bytes),
``cache.Residency`` (slot bookkeeping), ``policy.Policy`` (HEBF / LRU / none -> ``PrefetchPlan``),
``simulator.simulate`` (trace replay), ``transfer`` (pinned arena, GPU slot pool, side stream; imports torch),
``expert_cache.ExpertCache`` (the runtime API the vLLM MoE method calls).
"""
from mxserve.scheduler.cache import OffloadCounters, Residency
from mxserve.scheduler.config import OFFLOAD_CONFIG_VERSION, OffloadConfig, OffloadConfigError
from mxserve.scheduler.layout import PlaneLayout
from mxserve.scheduler.policy import PlanOp, Policy, PrefetchPlan

__all__ = ["OFFLOAD_CONFIG_VERSION", "OffloadConfig", "OffloadConfigError", "OffloadCounters", "PlaneLayout",
           "PlanOp", "Policy", "PrefetchPlan", "Residency"]
