"""Quantized dense linears: ``prepare_linear`` (canonical -> runtime layout) and ``dequant_linear`` (fused dequant
GEMM). Bit-exact canonical pack/unpack/dequantize oracle in ``quant.reference``; Triton dequantize to bf16:
``moe.grouped_gemm.dequant_bf16`` (bit-exact with the oracle rounded to bf16). Triton canonical-format launchers
``pack_codes`` / ``unpack_codes`` / ``dequantize`` (``quant.pack``): the oracle's signatures, bit-exact."""
from mxserve_kernels.quant.linear import LinearWeights, dequant_linear, prepare_linear
from mxserve_kernels.quant.pack import dequantize, pack_codes, unpack_codes

__all__ = ["LinearWeights", "dequant_linear", "dequantize", "pack_codes", "prepare_linear", "unpack_codes"]
