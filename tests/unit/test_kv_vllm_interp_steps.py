"""A real vLLM 0.26 ``Attention`` layer on the packed-KV backend, driven step by step under ``TRITON_INTERPRET=1``
with q/k/v laid out exactly as vLLM's models pass them, so the launchers' checks and the Triton store / decode kernels
run (every other CPU test of the backend takes the torch reference fallback).

Session 6 (H200, K2V1.5): the engine died in its second step, one decode token + a chunked-prefill continuation,
on "equal fp strides": with Qwen3's k-norm k is its own buffer while v is a column slice of the fused qkv, and for
one token ``.contiguous()`` returns both views unchanged with different size-1 strides.

Layouts (``LAYOUTS``): "qwen3" = q and k after a per-head RMSNorm (own [T, H*D] buffers), v a column slice of
qkv [T, (Hq + 2H) * D]; "llama" = q, k, v all column slices of qkv. Schedule (``STEPS``, page 16, 3 requests):
two prefills (B chunked), 1 decode + B's rest, pure decode B = 2 (+ a padded token, slot -1), decode B = 1, a
prefix-cache hit (C's first page is A's) next to a decode, decode B = 2 reading the shared page, then decode
B = 3 padded to a B = 4 FULL CUDA graph (a padded request with seq_len 0 on the null block).

Per step: ``layer(q, k, v)`` inside vLLM's forward context (``unified_kv_cache_update`` + the impl's ``forward``),
metadata from our ``MxKVMetadataBuilder.build``; then (1) the packed cache equals the reference store of the same
tokens bit for bit, (2) the output equals one fp32 oracle for every row: each token attends causally to its
request's earlier tokens dequantized from the SAME packed pages and to this step's tokens exactly
(``reference.paged_prefill_attention`` over the whole batch: a decode is a 1-token continuation), (3) the Triton
store and decode kernels were launched (not the reference fallback).

Each layout runs this file in a subprocess (``python tests/unit/test_kv_vllm_interp_steps.py <layout>``): the
interpreter must be on before triton is imported.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# layout -> (D, k_bits, v_bits, k_group, v_group, dtype): qwen3 is the session-6 format in fp16 (the interpreter's
# bf16 dot is broken; bf16 runs in tests/kernels), llama a 4/2-bit format in fp32 (the IEEE dot path)
LAYOUTS = {"qwen3": (64, 2, 1.5, 32, 64, "float16"), "llama": (32, 4, 2, 16, 32, "float32")}
HQ, H, PAGE, NUM_PAGES = 4, 2, 16, 12
# step -> ([(request, tokens already computed, new tokens)], padded token rows, FULL-graph padding), decodes first
# (vLLM's reorder, threshold 1). Padded rows get slot -1 (the runner pads num_tokens for CUDA graphs); under FULL
# graphs the runner also pads the requests (gpu_model_runner._build_attention_metadata): query length 0, seq_len 0,
# block-table row = null block, num_actual_tokens = the padded count, so our decode runs on the padded rows too.
STEPS = [
    ([("A", 0, 20), ("B", 0, 24)], 0, False),     # two prefills; B chunked (40-token prompt)
    ([("A", 20, 1), ("B", 24, 16)], 0, False),    # ONE decode token + the rest of B (cached context 24)
    ([("A", 21, 1), ("B", 40, 1)], 1, False),     # pure decode B = 2, one padded token row (piecewise graph)
    ([("B", 41, 1)], 0, False),                   # decode B = 1
    ([("B", 42, 1), ("C", 16, 10)], 0, False),    # prefix-cache hit: C's first page is A's (16 computed)
    ([("B", 43, 1), ("C", 26, 1)], 0, False),     # decode after the hit, reading the shared page
    ([("A", 22, 1), ("B", 44, 1), ("C", 27, 1)], 1, True),  # decode B = 3 replayed in the B = 4 FULL graph
]
# block tables (page 0 is vLLM's null block, never allocated); C shares A's first (full) page
TABLES = {"A": [5, 9], "B": [2, 11, 7], "C": [5, 3]}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vllm_steps_under_interpreter(layout):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, layout], env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, f"layout {layout} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    assert f"OK {layout} {len(STEPS)} steps" in r.stdout, r.stdout[-2000:]


# ---- run in the subprocess ---------------------------------------------------------------------------------------
def _vllm_cpu():
    """vLLM on its CPU platform with a 1-rank gloo group (as the ``vllm_cpu`` fixture of tests/conftest.py)."""
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform
    P._current_platform = CpuPlatform()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from tests.conftest import free_port
    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1)
    return cfg


def _layer(cfg, d, kb, vb, kg, vg):
    """An ``Attention`` layer built by vLLM with the mxmoe quant config holding a 1-layer KV plan (channel orders
    and a K clip set, so the store / decode permutation paths run)."""
    import torch
    from vllm.config import CacheConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from mxserve.config.quant_config import MxMoEConfig
    from mxserve.kvcache.config import KVQuantConfig
    from mxserve.vllm_plugin.quant_config import MxMoEQuantConfig
    qc = MxMoEConfig().to_dict()
    kv = KVQuantConfig.uniform(1, kb, vb, kg, vg).to_dict()
    g = torch.Generator().manual_seed(11)
    kv["layers"][0]["k_perm"] = [torch.randperm(d, generator=g).tolist() for _ in range(H)]
    kv["layers"][0]["v_perm"] = [torch.randperm(d, generator=g).tolist() for _ in range(H)]
    kv["layers"][0]["k_clip"] = 0.95
    qc["kv"] = kv
    with set_current_vllm_config(cfg):
        layer = Attention(HQ, d, d ** -0.5, num_kv_heads=H, cache_config=CacheConfig(block_size=PAGE),
                          quant_config=MxMoEQuantConfig.from_config(qc), prefix="model.layers.0.self_attn.attn",
                          attn_backend=TritonAttentionBackend)
        layer.quant_method.process_weights_after_loading(layer)
        spec = layer.get_kv_cache_spec(cfg)
    return layer, spec


def _qkv(layout, t, d, dtype, gen):
    """q, k, v as the model hands them to ``Attention.forward``: [T, Hq*D], [T, H*D], [T, H*D].

    qwen3: ``qkv.split`` then q-norm / k-norm per head (vllm models/qwen3_moe.py): q, k own buffers, v a slice.
    llama: the three ``qkv.split`` slices (row stride (Hq + 2H) * D)."""
    import torch
    import torch.nn.functional as F
    qkv = torch.randn(t, (HQ + 2 * H) * d, generator=gen).to(dtype)
    q, k, v = qkv.split([HQ * d, H * d, H * d], dim=-1)
    if layout == "qwen3":
        wq, wk = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype), (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
        q = F.rms_norm(q.view(t, HQ, d), (d,), wq, 1e-6).view(q.shape)
        k = F.rms_norm(k.view(t, H, d), (d,), wk, 1e-6).view(k.shape)
    own = [x.untyped_storage().data_ptr() != qkv.untyped_storage().data_ptr() for x in (q, k, v)]
    assert own == ([True, True, False] if layout == "qwen3" else [False] * 3) and v.stride(0) == qkv.stride(0)
    return q, k, v


def _metadata(step, pad, full, device):
    """vLLM's CommonAttentionMetadata of one step + the per-layer slot mapping (padded rows -> -1; ``full``: one
    padded request per padded row, as FULL CUDA graphs replay uniform decode)."""
    import torch
    from vllm.v1.attention.backend import CommonAttentionMetadata
    width = max(len(p) for p in TABLES.values())
    q_lens = torch.tensor([n for _, _, n in step], dtype=torch.int32)
    seq = torch.tensor([c + n for _, c, n in step], dtype=torch.int32)
    qsl = torch.zeros(len(step) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    table = torch.zeros(len(step), width, dtype=torch.int32)
    for i, (r, _, _) in enumerate(step):
        table[i, : len(TABLES[r])] = torch.tensor(TABLES[r], dtype=torch.int32)
    pos = torch.cat([torch.arange(c, c + n) for _, c, n in step])
    rows = torch.repeat_interleave(torch.arange(len(step)), q_lens.long())
    slots = table[rows, pos // PAGE].long() * PAGE + pos % PAGE
    n = int(qsl[-1])
    slots = torch.cat([slots, torch.full((pad,), -1, dtype=torch.long)])
    if full:  # padded requests: query length 0, seq_len 0, null-block table rows; every padded token is "actual"
        qsl = torch.cat([qsl, qsl[-1:].repeat(pad)])
        seq = torch.cat([seq, torch.zeros(pad, dtype=torch.int32)])
        table = torch.cat([table, torch.zeros(pad, width, dtype=torch.int32)])
    cam = CommonAttentionMetadata(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl, seq_lens=seq.to(device), num_reqs=len(seq),
        num_actual_tokens=n + pad * full, max_query_len=int(q_lens.max()), max_seq_len=int(seq.max()),
        block_table_tensor=table.to(device), slot_mapping=slots.to(device), seq_lens_cpu_upper_bound=seq)
    return cam, slots


class _Count:
    """Wraps a Triton kernel: counts ``kernel[grid](...)`` launches, then launches it."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def _run(layout):
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from mxserve.vllm_plugin.kv.backend import MxKVImpl, MxKVMetadataBuilder
    from mxserve_kernels.attention import decode, kv_store, reference as R
    from tests.tolerances import ATTENTION
    assert kv_store._interpret(), "TRITON_INTERPRET=1 must be set before triton is imported"
    d, kb, vb, kg, vg, dt = LAYOUTS[layout]
    dtype = getattr(torch, dt)
    cfg = _vllm_cpu()
    layer, spec = _layer(cfg, d, kb, vb, kg, vg)
    impl = layer.impl
    assert isinstance(impl, MxKVImpl)
    fmt, kp, vp = impl.fmt, impl.k_perm, impl.v_perm
    name = layer.layer_name
    counts: dict[str, int] = {}
    decode.paged_decode_kernel = _Count(decode.paged_decode_kernel, counts, "decode")
    kv_store.kv_store_kernel = _Count(kv_store.kv_store_kernel, counts, "store")
    layer.kv_cache = torch.zeros(NUM_PAGES, PAGE, H, spec.slot_bytes, dtype=torch.uint8)
    shadow = layer.kv_cache.clone()  # the reference store of the same tokens
    builder = MxKVMetadataBuilder(spec, [name], cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    tol = ATTENTION[dtype]
    for si, (step, pad, full) in enumerate(STEPS):
        cam, slots = _metadata(step, pad, full, torch.device("cpu"))
        b, n = len(step), sum(c for _, _, c in step)  # real requests / tokens (the rest is padding)
        q, k, v = _qkv(layout, n + pad, d, dtype, gen)
        md = builder.build(0, cam)
        before = dict(counts)
        with set_current_vllm_config(cfg), set_forward_context({name: md}, cfg, slot_mapping={name: slots}):
            out = layer(q, k, v)
        nd = md.num_decodes
        assert nd == sum(c == 1 for _, _, c in step) + pad * full, (si, nd)
        launched = {kk: counts.get(kk, 0) - before.get(kk, 0) for kk in ("store", "decode")}
        assert launched == {"store": 1, "decode": int(nd > 0)}, (si, launched)
        # (1) the packed pages: bit-exact vs the reference store (k, v strides as vLLM passes them)
        R.store_kv(shadow, k[:n].reshape(n, H, d), v[:n].reshape(n, H, d), slots[:n], fmt, kp, vp,
                   impl.k_clip, impl.v_clip)
        assert torch.equal(layer.kv_cache, shadow), f"step {si}: packed cache differs from the reference store"
        # (2) one oracle for every row over the SAME packed pages: context dequantized, this step's tokens exact
        ctx = torch.tensor([c for _, c, _ in step])
        ref = R.paged_prefill_attention(q[:n].float().view(n, HQ, d), k[:n].float().view(n, H, d),
                                        v[:n].float().view(n, H, d), cam.query_start_loc_cpu[: b + 1], ctx,
                                        layer.kv_cache, cam.block_table_tensor[:b], fmt, impl.scale, kp, vp)
        got = out[:n].view(n, HQ, d).float()
        assert torch.isfinite(out.view(-1, HQ, d)[: cam.num_actual_tokens]).all(), f"step {si}: non-finite output"
        torch.testing.assert_close(got, ref, **tol, msg=lambda m: f"{layout} step {si} {step}: {m}")
    print(f"OK {layout} {len(STEPS)} steps")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _run(sys.argv[1])
