"""Randomly initialised MoE checkpoints in the HF hub layout (``mxserve make-tiny``), tiny or at real geometry.

Tensor names and shapes come from the transformers model class itself (built on the ``meta`` device, one decoder
layer), converted to the hub layout (one tensor per expert projection, arch-specific names from
``mxserve.models.arch``), then generated shard by shard: random bf16 in a few seconds for tiny models, on the GPU
when present for real geometries (``--preset qwen3-30b-a3b --layers 48``).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

from mxserve.models.arch import ARCHS, MoEArch

# Real model geometries (config kwargs) for benchmarks. Layers can be overridden (e.g. 4 or 48).
PRESETS: dict[str, tuple[str, dict]] = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_experts=128, num_experts_per_tok=8, num_hidden_layers=48,
                                        num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        vocab_size=151936, max_position_embeddings=40960, norm_topk_prob=True)),
    "mixtral-8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                     num_experts_per_tok=2, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, vocab_size=32000,
                                     max_position_embeddings=32768)),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                                            shared_expert_intermediate_size=5632, num_experts=60,
                                            num_experts_per_tok=4, num_hidden_layers=24, num_attention_heads=16,
                                            num_key_value_heads=16, vocab_size=151936,
                                            max_position_embeddings=8192)),
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                  vocab_size=50304, max_position_embeddings=4096)),
}
SHARD_BYTES = 2 << 30
INIT_STD = 0.02
TOKENIZER_VOCAB = 4096


def tiny_config_kwargs(arch: str, *, layers: int, experts: int, top_k: int, hidden: int, inter: int, vocab: int,
                       heads: int, kv_heads: int, head_dim: int, max_pos: int = 4096) -> dict:
    """transformers config kwargs for a small model of ``arch``."""
    a = ARCHS[arch]
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              head_dim=head_dim, vocab_size=vocab, max_position_embeddings=max_pos, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
    kw[a.num_experts_field] = experts
    kw[a.top_k_field] = top_k
    kw[a.expert_inter_field] = inter
    if arch in ("qwen3_moe", "qwen2_moe"):
        kw["intermediate_size"] = 2 * inter  # dense MLP size (unused when every layer is MoE)
        kw["norm_topk_prob"] = arch == "qwen3_moe"
    if arch == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = 2 * inter
    return kw


def build_config(arch: str, kwargs: dict):
    import transformers
    a = ARCHS[arch]
    kwargs = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **kwargs}
    cfg = getattr(transformers, a.config_class)(**kwargs)
    cfg.architectures = [a.hf_architecture]
    cfg.dtype = "bfloat16"
    return cfg


def hub_tensor_shapes(arch: str, cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the hub checkpoint for ``cfg`` (all layers), in a stable order."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    a: MoEArch = ARCHS[arch]
    one = copy.deepcopy(cfg)
    one.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    layer0, other = [], []
    for name, t in model.state_dict().items():
        (layer0 if name.startswith("model.layers.0.") else other).append((name, tuple(t.shape)))
    per_layer: list[tuple[str, tuple[int, ...]]] = []
    for name, shape in layer0:
        rel = name[len("model.layers.0."):]
        if rel == "mlp.experts.gate_up_proj":  # [E, 2I, H] fused in memory -> gate/up per expert
            e, two_i, h = shape
            for x in range(e):
                per_layer.append((f"{a.moe}.experts.{x}.{a.gate}.weight", (two_i // 2, h)))
                per_layer.append((f"{a.moe}.experts.{x}.{a.up}.weight", (two_i // 2, h)))
        elif rel == "mlp.experts.down_proj":  # [E, H, I]
            for x in range(shape[0]):
                per_layer.append((f"{a.moe}.experts.{x}.{a.down}.weight", shape[1:]))
        elif rel.startswith("mlp."):
            per_layer.append((f"{a.moe}.{rel[len('mlp.'):]}", shape))
        else:
            per_layer.append((rel, shape))
    out = [(n, s) for n, s in other if not n.startswith("lm_head")]
    for layer in range(cfg.num_hidden_layers):
        out += [(f"model.layers.{layer}.{rel}", s) for rel, s in per_layer]
    out += [(n, s) for n, s in other if n.startswith("lm_head")]
    return out


def _shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, cur, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    return shards + ([cur] if cur else [])


def _random_tensors(shard, gen, device) -> Iterator[tuple[str, "object"]]:
    import torch
    for name, shape in shard:
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * INIT_STD).to(torch.bfloat16)
        yield name, t.cpu()


def write_random_checkpoint(arch: str, cfg, out_dir: pathlib.Path, *, seed: int, device: str | None = None,
                            progress: bool = False) -> None:
    """Write config.json + random bf16 safetensors shards (+ index) into ``out_dir`` (which must exist)."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    shards = _shards(hub_tensor_shapes(arch, cfg))
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress)):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = dict(_random_tensors(shard, gen, device))
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    if len(shards) > 1:
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(str(out_dir))


def make_tiny(arch: str, out_dir, *, layers: int = 2, experts: int = 8, top_k: int = 2, hidden: int = 128,
              inter: int = 64, vocab: int = 512, heads: int = 4, kv_heads: int = 2, head_dim: int = 32,
              seed: int = 0, preset: str | None = None, device: str | None = None, force: bool = False,
              progress: bool = False) -> pathlib.Path:
    """Write a random MoE checkpoint + locally trained tokenizer (with chat template) to ``out_dir`` atomically.

    Args:
        arch: one of ``mxserve.models.arch.ARCHS`` (qwen3_moe, mixtral, qwen2_moe, olmoe); ignored with ``preset``.
        preset: a real geometry from ``PRESETS``; ``layers`` overrides its layer count only if given != default.
    Returns:
        the checkpoint directory (loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM).
    """
    from mxserve.models.corpus import read_corpus
    from mxserve.models.tokenizer import train_tokenizer

    out = pathlib.Path(out_dir)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        arch, kwargs = PRESETS[preset]
        kwargs = dict(kwargs, num_hidden_layers=layers)
    else:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"hidden={hidden}, heads={heads}, kv_heads={kv_heads}: heads must divide evenly")
        if top_k > experts:
            raise ValueError(f"top_k={top_k} exceeds experts={experts}")
        kwargs = tiny_config_kwargs(arch, layers=layers, experts=experts, top_k=top_k, hidden=hidden, inter=inter,
                                    vocab=vocab, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=str(out.parent)))
    try:
        cfg = build_config(arch, kwargs)
        text, _ = read_corpus(max_bytes=1 << 20)
        tok = train_tokenizer(text, min(TOKENIZER_VOCAB, cfg.vocab_size), tmp)
        cfg.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
        cfg.pad_token_id = cfg.eos_token_id
        write_random_checkpoint(arch, cfg, tmp, seed=seed, device=device, progress=progress)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [cfg.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
             "pad_token_id": cfg.eos_token_id, "do_sample": False}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
