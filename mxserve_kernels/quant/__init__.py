"""Quantized dense linears: ``prepare_linear`` (canonical -> runtime layout) and ``dequant_linear`` (fused dequant
GEMM). Bit-exact canonical pack/unpack/dequantize oracle in ``quant.reference``; Triton dequantize to bf16:
``moe.grouped_gemm.dequant_bf16`` (bit-exact with the oracle rounded to bf16)."""
from mxserve_kernels.quant.linear import LinearWeights, dequant_linear, prepare_linear

__all__ = ["LinearWeights", "dequant_linear", "prepare_linear"]
