"""Mixed-precision MoE: ``prepare_experts`` (canonical -> runtime layout) and ``fused_moe`` (one grouped-GEMM launch
per projection for all experts' precisions). Pure-torch reference in ``moe.reference``; cost model in ``moe.cost``."""
from mxserve_kernels.moe.fused_moe import fused_moe, moe_config
from mxserve_kernels.moe.routing import Route, moe_align, route_from_vllm
from mxserve_kernels.moe.weights import MoEWeights, prepare_experts

__all__ = ["MoEWeights", "Route", "fused_moe", "moe_align", "moe_config", "prepare_experts", "route_from_vllm"]
