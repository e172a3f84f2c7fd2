"""vLLM 0.26 kernels as peers for ``mxserve_kernels.bench.bench_moe`` / ``bench_kv`` (same-run ratios).

bf16 ``fused_experts``, fp8 W8A8 ``fused_experts``, ``moe_wna16`` (Triton W4) and Marlin MoE W4
(``fused_marlin_moe`` on GPTQ-format random weights). Lives here because only ``mxserve.vllm_plugin`` imports vLLM;
the benchmark loads it by name (``--peers``).
"""
from __future__ import annotations

import torch


def moe_peers(e: int, h: int, i: int):
    """Builders for vLLM 0.26 peers: ({name: (make_fn(x, tw, ids) -> callable, weight bytes per expert)}, version)."""
    import vllm
    from vllm.model_executor.layers.fused_moe import fused_experts
    from vllm.model_executor.layers.fused_moe.config import (fp8_w8a8_moe_quant_config,
                                                             int4_w4a16_moe_quant_config)
    peers = {}
    w1 = (torch.randn(e, 2 * i, h, device="cuda") * 0.02).to(torch.bfloat16)
    w2 = (torch.randn(e, h, i, device="cuda") * 0.02).to(torch.bfloat16)
    peers["vllm_bf16"] = (lambda x, tw, ids: (lambda: fused_experts(x, w1, w2, tw, ids)), 2 * 3 * h * i)
    f8 = torch.float8_e4m3fn
    s1 = torch.full((e,), 1e-3, device="cuda")
    s2 = torch.full((e,), 1e-3, device="cuda")
    w1f, w2f = (w1 * 1000).to(f8), (w2 * 1000).to(f8)
    qf8 = fp8_w8a8_moe_quant_config(w1_scale=s1, w2_scale=s2, a1_scale=None, a2_scale=None)
    peers["vllm_fp8_w8a8"] = (lambda x, tw, ids: (lambda: fused_experts(x, w1f, w2f, tw, ids, quant_config=qf8)),
                              3 * h * i)
    gs = 128
    q1 = torch.randint(0, 256, (e, 2 * i, h // 2), dtype=torch.uint8, device="cuda")
    q2 = torch.randint(0, 256, (e, h, i // 2), dtype=torch.uint8, device="cuda")
    sc1 = torch.full((e, 2 * i, h // gs), 2e-3, dtype=torch.bfloat16, device="cuda")
    sc2 = torch.full((e, h, i // gs), 2e-3, dtype=torch.bfloat16, device="cuda")
    qw16 = int4_w4a16_moe_quant_config(w1_scale=sc1, w2_scale=sc2, w1_zp=None, w2_zp=None, block_shape=[0, gs])
    peers["vllm_wna16_w4"] = (lambda x, tw, ids: (lambda: fused_experts(x, q1, q2, tw, ids, quant_config=qw16)),
                              3 * h * i // 2 + 3 * h * i // gs * 2)
    peers["vllm_marlin_w4"] = _marlin_peer(e, h, i, gs)
    return peers, vllm.__version__


def _marlin_peer(e: int, h: int, i: int, gs: int):
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
    from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
    from vllm.scalar_type import scalar_types
    qt = scalar_types.uint4b8

    def one(n, k):  # GPTQ-format random weight [K, N] -> marlin tensors, replicated over experts
        w = (torch.randn(k, n, device="cuda") * 0.02).to(torch.bfloat16)
        _, qw, s, _, _, _ = marlin_quantize(w, qt, gs, act_order=False)
        return (torch.stack([qw] * e).contiguous(), torch.stack([s] * e).contiguous())
    qw1, s1 = one(2 * i, h)
    qw2, s2 = one(h, i)

    def make(x, tw, ids):
        return lambda: fused_marlin_moe(x, qw1, qw2, None, None, s1, s2, tw, ids, quant_type_id=qt.id,
                                        global_num_experts=e)
    return make, 3 * h * i // 2 + 3 * h * i // gs * 2


def kv_decode_peer(q: torch.Tensor, table: torch.Tensor, h: int, ctx: int, page: int, scale: float):
    """vLLM's bf16 paged decode (``flash_attn_varlen_func``, FA3 on Hopper) over the same block table as our packed
    cache, separate K and V pages: ``(name, fn)``; raises if it cannot run here (the bench then falls back).

    Args:
        q: [B, Hq, D] bf16 queries. table: [B, pages] int32 block table. h: kv heads. ctx: tokens per request.
        page: tokens per page. scale: softmax scale.
    """
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func, is_fa_version_supported
    b, _, d = q.shape
    kc = torch.randn(b * table.shape[1], page, h, d, device=q.device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    ver = 3 if torch.cuda.get_device_capability()[0] == 9 and is_fa_version_supported(3) else 2
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=q.device)
    used = torch.full((b,), ctx, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)

    def fa():
        return flash_attn_varlen_func(q=q, k=kc, v=vc, out=out, max_seqlen_q=1, cu_seqlens_q=cu_q, max_seqlen_k=ctx,
                                      seqused_k=used, softmax_scale=scale, causal=True, block_table=table,
                                      fa_version=ver)
    fa()
    torch.cuda.synchronize()
    return f"vllm_fa{ver}", fa
