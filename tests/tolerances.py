"""The one tolerance table of the test suite, chosen by operation class. Tests import from here; no inline magic
numbers for numerical comparisons."""
from __future__ import annotations

import torch

# Pack / unpack / quantize-and-store / cast: bit-exact (torch.equal).
BIT_EXACT = dict(atol=0.0, rtol=0.0)

# GEMM / attention vs an fp32 reference computed from the same (dequantized) inputs, by output dtype.
GEMM = {
    torch.float32: dict(atol=1e-3, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-1, rtol=1e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-3),
}
ATTENTION = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# Mixed-precision grouped GEMM vs dequantized fp32 reference: relative mean absolute error.
GROUPED_GEMM_REL_MEAN = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# Quantization quality floors (SQNR, dB) of a quantized linear vs the float one, random Gaussian weights, RTN.
SQNR_DB_MIN = {8: 40.0, 4: 16.0, 3: 10.0, 2: 4.0}
# 1-bit (int1 asym, 2-means levels) on Gaussian weights: Lloyd-Max 1-bit optimum is 4.40 dB; group-wise >= this.
SQNR_DB_MIN_1BIT = 4.0
# GPTQ must beat RTN by at least this much at 3 bits on correlated inputs (issue acceptance).
GPTQ_GAIN_DB_3BIT = 2.0
# Nested int4 prefix within this many dB of direct int4 RTN.
NESTED4_VS_INT4_DB = 1.0

# End-to-end logprob KL divergence: uniform W8 vs bf16.
KLD_W8_MAX = 1e-3


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB (fp64)."""
    ref = ref.double()
    noise = (ref - test.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))


def rel_mean_err(ref: torch.Tensor, test: torch.Tensor) -> float:
    """mean|ref - test| / mean|ref| in fp64."""
    ref = ref.double()
    return float((ref - test.double()).abs().mean() / ref.abs().mean().clamp_min(1e-300))

# KV-cache quantization quality (SQNR dB of dequantized K or V vs the original, Gaussian data, clip 1.0,
# per-token groups of 64 channels, ternary 128) and attention-output SQNR of the quantized cache vs fp attention.
KV_SQNR_DB_MIN = {8: 40.0, 4: 18.0, 2: 5.0, 1.5: 2.0}
KV_ATTN_SQNR_DB_MIN = {"K8V8": 38.0, "K4V4": 14.0, "K4V2": 4.0}  # iid Gaussian q,k,v, 256 keys, D=64

# Expert offloading (on_miss="wait") vs the same nested checkpoint all-resident, both served by vLLM: the slot-pool
# GEMM reads identical weights with the same kernel, so only batch-shape / graph-mode noise may differ.
OFFLOAD_GREEDY_AGREE_MIN = 0.98      # greedy token agreement, N prompts x G tokens
OFFLOAD_KLD_MAX = 1e-3               # mean prompt-logprob KL(all-resident || offloaded), nats
