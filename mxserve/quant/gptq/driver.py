"""Layer-by-layer calibration driver: owns hooks, calibration batches, device placement and progress.

Lifecycle: ``d = LayerDriver(ckpt, ids, device)`` -> ``d.start()`` (embeds the calibration tokens and captures the
decoder-layer call arguments) -> for each layer ``d.open_layer(l)`` (materialises ONLY that layer on the device),
``d.collect(l, dense)`` (one forward with hooks: MoE-block inputs, routing, Hessians), quantize, optionally
``d.set_expert_weights`` / ``d.set_dense_weight``, ``d.advance(l)`` (layer outputs become the next inputs),
``d.close_layer(l)`` (back to ``meta``). At most one decoder layer's weights live on the device at any time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxserve.checkpoint.hf_model import build_skeleton, materialize, release
from mxserve.checkpoint.reader import HFCheckpoint
from mxserve.quant.gptq.solver import accumulate_hessian, make_empty_hessian
from mxserve.quant.sensitivity import expert_ffn, expert_tokens


class _Catch(Exception):
    pass


class _Catcher(torch.nn.Module):
    def __init__(self, store: list):
        super().__init__()
        self.store = store

    def forward(self, hidden_states, **kwargs):
        self.store.append((hidden_states, kwargs))
        raise _Catch


@dataclass
class LayerData:
    """What one calibration forward through a decoder layer yields.

    Attributes:
        h: [T, H] MoE-block inputs (None for a dense layer).
        topk_idx, topk_w: [T, K] routing.
        h_gate_up: [E, H, H] per-expert Hessians of gate/up inputs (None without GPTQ).
        h_down: [E, I, I] per-expert Hessians of down inputs.
        dense_h: {in-memory linear name: [K, K] Hessian}.
    """

    h: torch.Tensor | None
    topk_idx: torch.Tensor | None
    topk_w: torch.Tensor | None
    h_gate_up: torch.Tensor | None
    h_down: torch.Tensor | None
    dense_h: dict[str, torch.Tensor]


class LayerDriver:
    """Runs calibration data through a checkpoint one decoder layer at a time.

    Args:
        ckpt: bf16 source checkpoint.
        ids: [N, S] calibration token ids.
        device: torch device; compute dtype is bf16 on CUDA, fp32 on CPU.
        batch_seqs: sequences per forward call.
    """

    def __init__(self, ckpt: HFCheckpoint, ids: torch.Tensor, device: torch.device, batch_seqs: int = 8):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = build_skeleton(ckpt, self.dtype)
        self.ids = ids
        self.batch_seqs = batch_seqs
        self.hidden: list[torch.Tensor] = []
        self.kwargs: list[dict] = []

    def start(self) -> None:
        """Embed calibration tokens and capture the arguments the model passes to decoder layer 0."""
        m = self.model.model
        materialize(self.ckpt, m.embed_tokens, "model.embed_tokens", self.dtype, self.device)
        m.rotary_emb.to(self.device)
        layer0 = m.layers[0]
        store: list = []
        m.layers[0] = _Catcher(store)
        try:
            with torch.no_grad():
                for b0 in range(0, self.ids.shape[0], self.batch_seqs):
                    try:
                        m(input_ids=self.ids[b0:b0 + self.batch_seqs].to(self.device), use_cache=False)
                    except _Catch:
                        pass
        finally:
            m.layers[0] = layer0
            release(m.embed_tokens)
        self.hidden = [h for h, _ in store]
        self.kwargs = [kw for _, kw in store]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def layer(self, l: int) -> torch.nn.Module:
        return self.model.model.layers[l]

    def open_layer(self, l: int) -> torch.nn.Module:
        """Materialise layer ``l`` on the device, parameters frozen: nothing downstream may record autograd
        graphs on them (a graph kept the layer's weights and GPTQ temporaries alive past ``close_layer``)."""
        layer = self.layer(l)
        materialize(self.ckpt, layer, f"model.layers.{l}", self.dtype, self.device)
        layer.requires_grad_(False)
        return layer

    def close_layer(self, l: int) -> None:
        release(self.layer(l))

    def _forward(self, layer) -> list[torch.Tensor]:
        outs = []
        with torch.no_grad():
            for h, kw in zip(self.hidden, self.kwargs):
                o = layer(h, **kw)
                outs.append(o[0] if isinstance(o, tuple) else o)
        return outs

    def collect(self, l: int, dense: list[str], hessians: bool) -> LayerData:
        """One forward through layer ``l`` capturing MoE inputs/routing and Hessians.

        Args:
            dense: in-memory names (relative to the layer) of nn.Linear modules whose input Hessians are wanted.
            hessians: compute per-expert Hessians (GPTQ) too.
        """
        layer = self.layer(l)
        mods = dict(layer.named_modules())
        moe = getattr(layer, "mlp", None)
        is_moe = moe is not None and hasattr(moe, "experts")
        dense_h = {n: make_empty_hessian(mods[n].in_features, device=self.device) for n in dense} if hessians else {}
        counts = {n: 0 for n in dense_h}
        captured: list[torch.Tensor] = []
        handles = []

        def dense_hook(name):
            def f(_m, args):
                counts[name] = accumulate_hessian(dense_h[name], counts[name], args[0].reshape(-1, args[0].shape[-1]))
            return f

        for n in dense_h:
            handles.append(mods[n].register_forward_pre_hook(dense_hook(n)))
        if is_moe:
            handles.append(moe.register_forward_pre_hook(
                lambda _m, args: captured.append(args[0].reshape(-1, args[0].shape[-1]))))
        try:
            self._outs = self._forward(layer)
        finally:
            for hd in handles:
                hd.remove()
        if not is_moe:
            return LayerData(None, None, None, None, None, dense_h)
        h = torch.cat(captured)
        captured.clear()
        with torch.no_grad():
            _, w, idx = moe.gate(h)
        hg = hd_ = None
        if hessians:
            hg, hd_ = self.expert_hessians(moe, h, idx)
        return LayerData(h, idx, w, hg, hd_, dense_h)

    @torch.no_grad()
    def expert_hessians(self, moe, h: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert GPTQ Hessians ([E, H, H] gate/up inputs, [E, I, I] down inputs) from MoE inputs h [T, H]
        routed by idx [T, K]."""
        gu, dn = moe.experts.gate_up_proj, moe.experts.down_proj
        e, _, hid = gu.shape
        inter = dn.shape[2]
        hg = make_empty_hessian(hid, e, self.device)
        hd = make_empty_hessian(inter, e, self.device)
        dummy_w = torch.ones_like(idx, dtype=torch.float32)
        for x in range(e):
            tok, _ = expert_tokens(idx, dummy_w, x)
            if tok.numel() == 0:
                continue
            xin = h[tok].float()
            accumulate_hessian(hg[x], 0, xin)
            a, _ = expert_ffn(xin, gu[x].float(), dn[x].float(), moe.experts.act_fn)
            accumulate_hessian(hd[x], 0, a)
        return hg, hd

    def output_energy(self) -> float:
        """Sum of squares of the last ``collect``ed layer's outputs (the residual stream after it), fp64."""
        return float(sum(o.double().pow(2).sum() for o in self._outs))

    def advance(self, l: int, recompute: bool) -> None:
        """Make layer ``l``'s outputs the next layer's inputs (re-running it if its weights changed)."""
        self.hidden = self._forward(self.layer(l)) if recompute else self._outs
        self._outs = None

    # ---- weight write-back (so later layers see quantized outputs) ------------------------------------------
    def set_expert_weights(self, l: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        ex = self.layer(l).mlp.experts
        ex.gate_up_proj.data.copy_(gate_up.to(ex.gate_up_proj.dtype))
        ex.down_proj.data.copy_(down.to(ex.down_proj.dtype))

    def set_dense_weight(self, l: int, name: str, w: torch.Tensor) -> None:
        mod = dict(self.layer(l).named_modules())[name]
        mod.weight.data.copy_(w.to(mod.weight.dtype))
