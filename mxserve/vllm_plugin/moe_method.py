"""``MxMoEMethod``: mixed-precision routed experts for vLLM 0.26 (``FusedMoEMethodBase`` on ``RoutedExperts``).

Storage while loading: experts of one layer may use different schemes (different tensor shapes), so each
(projection, tensor suffix) pair gets ONE flat uint8 parameter (``w13_qweight``, ``w13_scales``, ``w2_zeros``,
``w13_weight`` for bf16 experts, ``w2_plane3_weight``...) holding this rank's local experts back to back; a per-expert
table gives (byte offset, shape, dtype). ``w13`` of an expert is row-concat(gate, up) of its canonical tensors (rows
sliced to this TP rank), ``w2`` is the canonical down tensor with its K (=I) columns sliced to this TP rank. The total
is exactly the canonical size: no bf16 copy, so peak memory while loading stays near the final footprint.

Lifecycle:
  * ``create_weights``: validates the plan against the layer (expert count, group size divides H and I/tp) and
    allocates the flat parameters with a custom ``weight_loader`` (vLLM's ``RoutedExperts.load_weights`` maps
    ``experts.{e}.{gate|up|down}.{suffix}`` to ``w13_/w2_{suffix}`` and calls it with the global expert id).
  * ``process_weights_after_loading``: coverage check (names every missing checkpoint tensor), then the one canonical
    -> kernel layout conversion (``kernel_adapter.prepare_experts``) and the flat parameters are dropped.
  * ``apply(layer, x, topk_weights, topk_ids, ...)``: routing already happened in the runner; runs inside vLLM's
    opaque ``moe_forward`` op, so it is CUDA-graph captured but never traced by Dynamo.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs

from mxserve.config.quant_config import ExpertPlan
from mxserve.vllm_plugin import kernel_adapter as ka
from mxserve.vllm_plugin import weight_stats
from mxserve.vllm_plugin.linear_method import canonical_shape, check_divisible
from mxserve.vllm_plugin.loading import UnexpectedTensorError, check_loaded, fill_dummy_, is_dummy_load
from mxserve_kernels.formats import WeightScheme, tensor_names

_ALIGN = 16  # byte alignment of every per-expert region (views as bf16/fp16 need even offsets)


@dataclass(frozen=True)
class Region:
    """Where one canonical tensor of one local expert lives in its flat parameter."""

    offset: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize


def plan_layout(schemes: list[WeightScheme], rows: int, k: int, weight_dtype: torch.dtype
                ) -> tuple[list[dict[str, Region]], dict[str, int]]:
    """Per-expert regions and per-suffix total bytes for one projection.

    Args:
        schemes: scheme of each local expert.
        rows: output rows per expert (2I/tp for w13, H for w2).
        k: input features per expert on this rank (H for w13, I/tp for w2).
        weight_dtype: dtype of bf16-passthrough experts (``weight`` tensor).
    Returns:
        (regions[e][suffix], totals[suffix] in bytes).
    """
    totals: dict[str, int] = {}
    regions: list[dict[str, Region]] = []
    for s in schemes:
        reg = {}
        for suf in tensor_names(s):
            shape, dtype = ((rows, k), weight_dtype) if suf == "weight" else canonical_shape(s, suf, rows, k)
            off = totals.get(suf, 0)
            r = Region(off, shape, dtype)
            reg[suf] = r
            totals[suf] = off + -(-r.nbytes // _ALIGN) * _ALIGN
        regions.append(reg)
    return regions, totals


def region_view(buf: torch.Tensor, r: Region) -> torch.Tensor:
    """The [rows, cols] ``r.dtype`` view of region ``r`` inside flat uint8 ``buf``."""
    return buf[r.offset: r.offset + r.nbytes].view(r.dtype).view(r.shape)


class MxMoEMethod(FusedMoEMethodBase):
    """Fused-MoE method for one layer's mixed-precision experts.

    Args:
        plan: per global expert, the gate_up and down schemes.
        prefix: vLLM name of the experts module (``model.layers.3.mlp.experts``).
        moe: vLLM's FusedMoEConfig of the layer.
        plan_cfg: the whole ``MxMoEConfig`` (weight metrics' quant-config info); None = no metrics.
    """

    def __init__(self, plan: ExpertPlan, prefix: str, moe, plan_cfg=None) -> None:
        super().__init__(moe)
        self.plan = plan
        self.prefix = prefix
        self.plan_cfg = plan_cfg

    # ---- weights ------------------------------------------------------------------------------------------------
    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        E, H, Ip = layer.global_num_experts, hidden_size, intermediate_size_per_partition
        tp = layer.moe_config.tp_size
        if self.plan.num_experts != E:
            raise ValueError(f"mxmoe: {self.prefix}: the plan lists {self.plan.num_experts} experts, the model has {E}")
        act = getattr(layer.activation, "value", layer.activation)
        if act != "silu":
            raise ValueError(f"mxmoe: {self.prefix}: activation {act!r} is not supported (silu only)")
        if layer.apply_router_weight_on_input:
            raise ValueError(f"mxmoe: {self.prefix}: apply_router_weight_on_input is not supported")
        local_to_global = [-1] * num_experts
        for g in range(E):
            loc = layer._map_global_expert_id_to_local_expert_id(g)
            if loc >= 0:
                local_to_global[loc] = g
        for g in local_to_global:
            check_divisible(self.plan.gate_up[g], H, 1, f"{self.prefix}.{g} gate_up (K = hidden size)")
            check_divisible(self.plan.down[g], Ip, tp, f"{self.prefix}.{g} down (K = moe intermediate size)")
        w13_regions, w13_totals = plan_layout([self.plan.gate_up[g] for g in local_to_global], 2 * Ip, H, params_dtype)
        w2_regions, w2_totals = plan_layout([self.plan.down[g] for g in local_to_global], H, Ip, params_dtype)
        layer._mx_layout = {"w13": w13_regions, "w2": w2_regions}
        layer._mx_local_to_global = local_to_global
        layer._mx_loaded = set()
        layer._mx_dims = (H, Ip)
        all_suffixes = {
            "w13": {s for sc in self.plan.gate_up for s in tensor_names(sc)},
            "w2": {s for sc in self.plan.down for s in tensor_names(sc)},
        }
        totals = {"w13": w13_totals, "w2": w2_totals}
        layer._mx_params = []
        for proj in ("w13", "w2"):
            for suf in sorted(all_suffixes[proj]):
                name = f"{proj}_{suf}"
                p = torch.nn.Parameter(torch.empty(totals[proj].get(suf, 0), dtype=torch.uint8), requires_grad=False)
                layer.register_parameter(name, p)
                set_weight_attrs(p, {"weight_loader": self._make_loader(layer, proj, suf)})
                layer._mx_params.append(name)

    def _ckpt_name(self, layer, global_id: int, shard_id: str, suffix: str) -> str:
        proj = {"w1": layer.ckpt_gate_proj_name, "w3": layer.ckpt_up_proj_name, "w2": layer.ckpt_down_proj_name}
        return f"{self.prefix}.{global_id}.{proj[shard_id]}.{suffix}"

    def _make_loader(self, layer: torch.nn.Module, proj: str, suffix: str):
        def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, weight_name: str = "",
                          shard_id: str = "", expert_id: int = -1, return_success: bool = False):
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local < 0:
                return False if return_success else None
            name = self._ckpt_name(layer, expert_id, shard_id, suffix)
            region = layer._mx_layout[proj][local].get(suffix)
            if region is None:
                scheme = (self.plan.gate_up if proj == "w13" else self.plan.down)[expert_id]
                raise UnexpectedTensorError(f"mxmoe: unexpected tensor {name}: expert {expert_id} uses scheme "
                                            f"{scheme.name}, which has no {suffix!r} tensor")
            w = loaded_weight
            if suffix == "weight":
                w = w.to(region.dtype)
            elif w.dtype != region.dtype:
                raise UnexpectedTensorError(f"mxmoe: {name}: dtype {w.dtype}, expected {region.dtype}")
            tp, rank = layer.moe_config.tp_size, layer.moe_config.tp_rank
            rows, cols = region.shape
            dest = region_view(param.data, region)
            if shard_id in ("w1", "w3"):
                half = rows // 2
                if tuple(w.shape) != (half * tp, cols):
                    raise UnexpectedTensorError(f"mxmoe: {name}: shape {tuple(w.shape)}, expected {(half * tp, cols)}")
                w = w.narrow(0, rank * half, half)
                dest = dest[:half] if shard_id == "w1" else dest[half:]
            else:
                if tuple(w.shape) != (rows, cols * tp):
                    raise UnexpectedTensorError(f"mxmoe: {name}: shape {tuple(w.shape)}, expected {(rows, cols * tp)}")
                w = w.narrow(1, rank * cols, cols)
            dest.copy_(w)
            layer._mx_loaded.add((local, shard_id, suffix))
            return True if return_success else None
        return weight_loader

    def _expected(self, layer) -> dict[tuple[int, str, str], str]:
        out = {}
        for local, g in enumerate(layer._mx_local_to_global):
            for shard_id, regions in (("w1", layer._mx_layout["w13"]), ("w3", layer._mx_layout["w13"]),
                                      ("w2", layer._mx_layout["w2"])):
                for suf in regions[local]:
                    out[(local, shard_id, suf)] = self._ckpt_name(layer, g, shard_id, suf)
        return out

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not hasattr(layer, "_mx_layout"):
            return  # already processed
        dummy = is_dummy_load()
        if not dummy:
            check_loaded(self.prefix, self._expected(layer), layer._mx_loaded)
        H, Ip = layer._mx_dims
        experts = {}
        for proj, plan in (("w13", self.plan.gate_up), ("w2", self.plan.down)):
            lst = []
            for local, g in enumerate(layer._mx_local_to_global):
                regs = layer._mx_layout[proj][local]
                tensors = {suf: region_view(getattr(layer, f"{proj}_{suf}").data, r) for suf, r in regs.items()}
                if dummy:
                    fill_dummy_(plan[g], tensors)
                lst.append((plan[g], tensors))
            experts[proj] = lst
        if self.plan_cfg is not None:
            weight_stats.record_lazy(self.prefix, lambda: self._precision_bytes(layer), self.plan_cfg)
        layer._mx_moe = ka.prepare_experts(gate_up=experts["w13"], down=experts["w2"], hidden=H, inter=Ip)
        ka.warm_kernels(layer._mx_moe, top_k=self.moe.experts_per_token,
                        expert_map=getattr(layer, "expert_map", None))  # EP: the map variant too
        for name in layer._mx_params:
            delattr(layer, name)
        del layer._mx_layout, layer._mx_loaded

    def _precision_bytes(self, layer) -> dict[str, tuple[int, int, int]]:
        """{precision: (bytes, elements, bits)} of this rank's experts (canonical storage, scales included)."""
        H, Ip = layer._mx_dims
        out: dict[str, tuple[int, int, int]] = {}
        for proj, plan, elems in (("w13", self.plan.gate_up, 2 * Ip * H), ("w2", self.plan.down, H * Ip)):
            for local, g in enumerate(layer._mx_local_to_global):
                regs = layer._mx_layout[proj][local]
                s = plan[g]
                dtype = regs["weight"].dtype if "weight" in regs else None
                label = weight_stats.precision_label(s if s.bits != 16 else None, dtype)
                bits = s.bits if s.bits != 16 else dtype.itemsize * 8
                b, n, _ = out.get(label, (0, 0, bits))
                out[label] = (b + sum(r.nbytes for r in regs.values()), n + elems, bits)
        return out

    # ---- execution ----------------------------------------------------------------------------------------------
    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        return None

    def maybe_make_prepare_finalize(self, routing_tables=None):
        if self.moe.moe_parallel_config.use_all2all_kernels:
            raise ValueError("mxmoe: all2all expert parallelism (DP x EP) is not supported; use TP or "
                             "--enable-expert-parallel without data parallelism")
        return None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], topk_weights/topk_ids [T, K] (global expert ids) -> [T, H] partial sum of this rank."""
        return ka.experts_forward(x, layer._mx_moe, topk_weights, topk_ids, layer.expert_map, activation="silu")
