"""Pure-torch forward of the supported MoE architectures over a flat batch of tokens from many sequences.

Continuous batching layout: the tokens of every scheduled sequence (a prefill chunk or one decode token) are
concatenated into one ``[T]`` batch; norms, projections and the MoE run over all T tokens at once, attention runs
per sequence against that sequence's own KV cache (``mxserve.engine.kv_cache``).

Semantics follow transformers' implementations (verified logits-allclose in ``tests/unit/test_engine_model.py``):
softmax top-k routing with each arch's ``norm_topk_prob`` (Mixtral always renormalises), Qwen2-MoE shared expert
with a sigmoid gate, per-head q/k RMSNorm (Qwen3-MoE) or full-width q/k RMSNorm (+ optional clip_qkv, OLMoE),
rotate-half RoPE, GQA.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mxserve.engine.kv_cache import KVCache
from mxserve.engine.weights import CheckpointReader, quant_config_of, read_config
from mxserve.models.arch import MoEArch, arch_for_config


@dataclass(frozen=True)
class ModelSpec:
    """Geometry and numerics read from config.json (letters: H hidden, E experts, K top-k, I expert inter, D head)."""

    arch: MoEArch
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    top_k: int
    norm_topk: bool
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    clip_qkv: float | None
    qk_norm: str | None              # "head" (Qwen3-MoE), "full" (OLMoE) or None
    dense_layers: frozenset[int] = field(default_factory=frozenset)
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelSpec":
        arch = arch_for_config(cfg)

        def need(k: str, *alts: str):
            for key in (k,) + alts:
                if cfg.get(key) is not None:
                    return cfg[key]
            raise ValueError(f"config.json: missing field {k!r} for {arch.arch}")

        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", None):
            raise ValueError(f"config.json rope_parameters.rope_type={rtype!r}: only 'default' RoPE is supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        layers = need("num_hidden_layers")
        dense: set[int] = set()
        if arch.arch in ("qwen3_moe", "qwen2_moe"):
            step = int(cfg.get("decoder_sparse_step") or 1)
            dense = {i for i in range(layers) if i in (cfg.get("mlp_only_layers") or []) or (i + 1) % step}
        if cfg.get("use_sliding_window"):
            raise ValueError("config.json use_sliding_window=true is not supported by the embedded engine")
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            arch=arch, layers=layers, hidden=hidden, heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads, vocab=need("vocab_size"),
            experts=need(arch.num_experts_field, "num_local_experts", "num_experts"),
            top_k=need(arch.top_k_field), norm_topk=True if arch.arch == "mixtral" else bool(cfg.get("norm_topk_prob")),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            max_positions=int(cfg.get("max_position_embeddings") or 4096),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), clip_qkv=cfg.get("clip_qkv"),
            qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(arch.arch), dense_layers=frozenset(dense),
            eos_token_ids=eos)


@dataclass
class Layer:
    """Weights of one decoder layer (all [N, K] linears already dequantized, compute dtype)."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    bias: dict[str, torch.Tensor | None]
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    router: torch.Tensor | None                  # [E, H]; None for a dense layer
    gate_up: list[torch.Tensor]                  # per expert [2I, H] (gate rows then up rows); dense: one entry
    down: list[torch.Tensor]                     # per expert [H, I]
    shared_gate_up: torch.Tensor | None = None   # Qwen2-MoE shared expert
    shared_down: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None      # [1, H]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 over the last dim, as transformers computes it."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, heads, D]; positions: [T] int64."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def expert_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP. x: [T, H]; gate_up: [2I, H]; down: [H, I] -> [T, H]."""
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)


def moe_forward(x: torch.Tensor, layer: Layer, spec: ModelSpec) -> torch.Tensor:
    """Routed experts (+ shared expert). x: [T, H] -> [T, H].

    This per-expert loop is the reference path; ``mxserve_kernels.moe.fused_moe(x, w, topk_weights, topk_ids)``
    replaces it when the kernels land (same routing tensors: topk_weights [T, K], topk_ids [T, K]).
    """
    probs = torch.softmax(F.linear(x, layer.router).float(), dim=-1)           # [T, E]
    topw, topi = torch.topk(probs, spec.top_k, dim=-1)                          # [T, K]
    if spec.norm_topk:
        topw = topw / topw.sum(dim=-1, keepdim=True)
    topw = topw.to(x.dtype)
    out = torch.zeros_like(x)
    for e in torch.unique(topi).tolist():
        tok, slot = torch.where(topi == e)
        y = expert_mlp(x[tok], layer.gate_up[e], layer.down[e]) * topw[tok, slot, None]
        out.index_add_(0, tok, y)
    if layer.shared_gate_up is not None:
        shared = expert_mlp(x, layer.shared_gate_up, layer.shared_down)
        out = out + torch.sigmoid(F.linear(x, layer.shared_gate)) * shared
    return out


class MoEModel:
    """A loaded MoE causal LM (CPU, compute dtype fp32 by default).

    Lifecycle: ``MoEModel.load(dir)`` reads and dequantizes every weight once; ``forward`` is then called by the
    engine thread only (not thread-safe, no autograd).
    """

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor,
                 lm_head: torch.Tensor, weight_bytes: dict[str, int], quantized: bool):
        self.spec, self.embed, self.layers, self.norm, self.lm_head = spec, embed, layers, norm, lm_head
        self.weight_bytes = dict(weight_bytes)
        self.quantized = quantized
        self.dtype = embed.dtype
        self.kv_config = None   # mxserve.kvcache.config.KVQuantConfig of quantization_config.kv, if any

    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "MoEModel":
        """Load an HF (bf16) or mxmoe checkpoint directory. Errors name the file / tensor / field."""
        cfg = read_config(model_dir)
        spec = ModelSpec.from_config(cfg)
        quant = quant_config_of(cfg)
        r = CheckpointReader(model_dir, quant, dtype)
        a = spec.arch
        layers = []
        for li in range(spec.layers):
            p = a.layer_prefix(li)
            proj = {n: a.attn_proj(li, n) for n in a.attn_projs}
            norm_kind = spec.qk_norm
            lay = Layer(
                ln1=r.get(f"{p}.input_layernorm.weight"), ln2=r.get(f"{p}.post_attention_layernorm.weight"),
                q=r.linear(proj["q_proj"]), k=r.linear(proj["k_proj"]), v=r.linear(proj["v_proj"]),
                o=r.linear(proj["o_proj"]), bias={n: r.opt(f"{m}.bias") for n, m in proj.items()},
                q_norm=r.get(f"{p}.self_attn.q_norm.weight") if norm_kind else None,
                k_norm=r.get(f"{p}.self_attn.k_norm.weight") if norm_kind else None,
                router=None, gate_up=[], down=[])
            if li in spec.dense_layers:
                mp = f"{p}.{a.moe}"
                lay.gate_up = [torch.cat([r.linear(f"{mp}.{a.gate}"), r.linear(f"{mp}.{a.up}")])]
                lay.down = [r.linear(f"{mp}.{a.down}")]
            else:
                lay.router = r.get(f"{a.moe_prefix(li)}.{a.router}.weight")
                for e in range(spec.experts):
                    s_gu, s_d = r.expert_schemes(a.experts_prefix(li), e)
                    lay.gate_up.append(torch.cat([r.linear(a.expert_proj(li, e, "gate"), s_gu),
                                                  r.linear(a.expert_proj(li, e, "up"), s_gu)]))
                    lay.down.append(r.linear(a.expert_proj(li, e, "down"), s_d))
                if a.shared_expert:
                    lay.shared_gate_up = torch.cat([r.linear(a.shared_proj(li, "gate")),
                                                    r.linear(a.shared_proj(li, "up"))])
                    lay.shared_down = r.linear(a.shared_proj(li, "down"))
                    lay.shared_gate = r.get(f"{a.moe_prefix(li)}.{a.shared_expert_gate}.weight")
            layers.append(lay)
        embed = r.get("model.embed_tokens.weight")
        if spec.tie_embeddings or not r.has("lm_head.weight"):
            lm_head = embed
        else:
            lm_head = r.linear("lm_head")
        model = cls(spec, embed, layers, r.get("model.norm.weight"), lm_head, r.weight_bytes, quant is not None)
        if quant is not None and quant.kv:
            from mxserve.kvcache.config import KVQuantConfig
            model.kv_config = KVQuantConfig.from_dict(quant.kv)
            model.kv_config.validate_model(spec.layers, spec.kv_heads, spec.head_dim)
        return model

    # ---- forward ----------------------------------------------------------------------------------------------
    def _attention(self, h: torch.Tensor, lay: Layer, li: int, positions: torch.Tensor,
                   spans: list[tuple[int, int]], caches: list[KVCache]) -> torch.Tensor:
        s = self.spec
        b = lay.bias
        q, k, v = F.linear(h, lay.q, b["q_proj"]), F.linear(h, lay.k, b["k_proj"]), F.linear(h, lay.v, b["v_proj"])
        if s.qk_norm == "full":
            q, k = rms_norm(q, lay.q_norm, s.rms_eps), rms_norm(k, lay.k_norm, s.rms_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        t = h.shape[0]
        q, k, v = q.view(t, s.heads, s.head_dim), k.view(t, s.kv_heads, s.head_dim), v.view(t, s.kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = rms_norm(q, lay.q_norm, s.rms_eps), rms_norm(k, lay.k_norm, s.rms_eps)
        q, k = rope(q, positions, s.rope_theta), rope(k, positions, s.rope_theta)
        out = torch.empty(t, s.heads, s.head_dim, dtype=h.dtype)
        for (a, z), cache in zip(spans, caches):
            out[a:z] = cache.attend(li, q[a:z], k[a:z], v[a:z], positions[a:z], s.head_dim ** -0.5)
        return F.linear(out.reshape(t, -1), lay.o, b["o_proj"])

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, spans: list[tuple[int, int]],
                caches: list[KVCache], all_tokens: bool = False) -> torch.Tensor:
        """Run the flat batch; returns final hidden states of each span's last token.

        Args:
            input_ids: [T] int64, the concatenated new tokens of every sequence.
            positions: [T] int64 absolute positions (a sequence's span continues its cache).
            spans: per sequence ``(start, end)`` into the T tokens.
            caches: per sequence KV cache (appended in place).
            all_tokens: return every token's hidden state ([T, H]) instead (used by tests).
        Returns:
            [B, H] hidden states (after the final norm) of the last token of each span.
        """
        s = self.spec
        x = self.embed[input_ids]
        for li, lay in enumerate(self.layers):
            x = x + self._attention(rms_norm(x, lay.ln1, s.rms_eps), lay, li, positions, spans, caches)
            h = rms_norm(x, lay.ln2, s.rms_eps)
            x = x + (expert_mlp(h, lay.gate_up[0], lay.down[0]) if lay.router is None else moe_forward(h, lay, s))
        if all_tokens:
            return rms_norm(x, self.norm, s.rms_eps)
        last = torch.tensor([z - 1 for _, z in spans], dtype=torch.int64)
        return rms_norm(x[last], self.norm, s.rms_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] -> [B, V] fp32 logits."""
        return F.linear(hidden, self.lm_head).float()

    def new_cache(self, factory=None) -> KVCache:
        """A fresh KV cache for one sequence (``factory(layers, kv_heads, head_dim, dtype)`` picks the class;
        default bf16 storage)."""
        from mxserve.engine.kv_cache import make_cache
        s = self.spec
        return (factory or make_cache)(s.layers, s.kv_heads, s.head_dim, self.dtype)
