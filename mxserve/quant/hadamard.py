"""Offline Hadamard (incoherence) rotation of the attention value/output pair, exact with no runtime op.

Only weight pairs whose inverse rotation folds into the adjacent weight *without crossing a non-linearity, a
norm or RoPE* can be rotated offline. In the supported family (qwen3_moe, qwen2_moe, mixtral, olmoe):

* **v_proj / o_proj, per head: qualifies.** For KV head g, V_g = x W_v,g^T + b_g  [T, D]; attention mixes V along
  the token axis only, so V_g Q (Q [D, D] orthogonal) passes through softmax(QK^T) unchanged and
  ``o_proj`` columns of every query head h reading kv head g(h) absorb Q^T:  A V Q Q^T W_o,h^T = A V W_o,h^T.
  Rewrites: W_v,g <- Q^T W_v,g (rows), b_g <- Q^T b_g, W_o[:, h] <- W_o[:, h] Q. One Q for all heads (GQA safe).
  The gain is on ``o_proj``: its input (= quantization-group) axis within each head is mixed, spreading outlier
  columns across the group (D = 128 = group size on Qwen3).
* **q_proj / k_proj: no.** q.k is invariant under a common rotation, but RoPE (2x2 rotations on fixed pairs) and
  Qwen3/OLMoE's q_norm/k_norm (per-channel RMSNorm gains) sit between the projection and the dot product and do
  not commute with a dense Q.
* **experts (gate/up -> SiLU(g)*u -> down) and the shared expert: no.** The element-wise SiLU gate does not
  commute with any rotation but a permutation, so the down-projection input can only be rotated with an online
  Hadamard at runtime (QuaRot), which the kernels do not have. Rotating gate/up *inputs* or down *outputs* means
  rotating the residual stream: RMSNorm gain folding, embeddings, lm_head, router and every layer (full QuaRot),
  not done here.

Q = diag(s) H_D / sqrt(D) (randomised Sylvester Hadamard, s a seeded +-1 vector); D must be a power of two.
"""
from __future__ import annotations

import torch

V_PROJ, O_PROJ = "self_attn.v_proj", "self_attn.o_proj"


def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [n, n] (fp64), entries +-1/sqrt(n).

    Args:
        n: size, a power of two.
    Raises:
        ValueError: n is not a power of two.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Q = diag(s) H_n / sqrt(n) [n, n] fp64, orthogonal; s in {-1, +1}^n drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return s[:, None] * hadamard_matrix(n)


def rotate_vo(v_w: torch.Tensor, v_b: torch.Tensor | None, o_w: torch.Tensor, q: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Rotate a value/output projection pair per head; the attention output is unchanged.

    Args:
        v_w: [G*D, H] v_proj weight (G kv heads of size D).
        v_b: [G*D] v_proj bias or None.
        o_w: [H, N*D] o_proj weight (N query heads, N a multiple of G).
        q: [D, D] orthogonal rotation.
    Returns:
        (v_w', v_b', o_w') in fp32, same shapes.
    """
    d = q.shape[0]
    if v_w.shape[0] % d or o_w.shape[1] % d:
        raise ValueError(f"rotate_vo: v_proj rows {v_w.shape[0]} / o_proj columns {o_w.shape[1]} are not multiples "
                         f"of head_dim {d}")
    q = q.to(v_w.device, torch.float64)
    vw = v_w.double().reshape(-1, d, v_w.shape[1])                 # [G, D, H]
    vw = torch.einsum("ed,gdh->geh", q.T, vw).reshape(v_w.shape)
    vb = None if v_b is None else (v_b.double().reshape(-1, d) @ q).reshape(v_b.shape)
    ow = (o_w.double().reshape(o_w.shape[0], -1, d) @ q).reshape(o_w.shape)    # [H, N, D] @ Q
    return vw.float(), None if vb is None else vb.float(), ow.float()


def rotate_layer_attention(layer: torch.nn.Module, head_dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Rotate ``layer.self_attn``'s v_proj/o_proj in place (a transformers decoder layer).

    The module weights are overwritten (cast to their dtype); the fp32 rotated tensors are also returned so a
    quantizer can start from them rather than from a bf16-rounded copy.

    Args:
        layer: decoder layer with ``self_attn.v_proj`` / ``self_attn.o_proj`` nn.Linear modules.
        head_dim: D.
        seed: seed of the random signs.
    Returns:
        {"self_attn.v_proj": [G*D, H], "self_attn.o_proj": [H, N*D], and "self_attn.v_proj.bias": [G*D] if any},
        fp32.
    """
    att = layer.self_attn
    v, o = att.v_proj, att.o_proj
    q = random_hadamard(head_dim, seed)
    vw, vb, ow = rotate_vo(v.weight.data, None if v.bias is None else v.bias.data, o.weight.data, q)
    v.weight.data.copy_(vw.to(v.weight.dtype))
    o.weight.data.copy_(ow.to(o.weight.dtype))
    out = {V_PROJ: vw, O_PROJ: ow}
    if vb is not None:
        v.bias.data.copy_(vb.to(v.bias.dtype))
        out[V_PROJ + ".bias"] = vb
    return out


def can_rotate(layer: torch.nn.Module, head_dim: int, quantized: set[str]) -> bool:
    """True when both v_proj and o_proj of ``layer`` are quantized and ``head_dim`` is a power of two."""
    return (V_PROJ in quantized and O_PROJ in quantized and hasattr(layer, "self_attn")
            and head_dim > 0 and not head_dim & (head_dim - 1))
