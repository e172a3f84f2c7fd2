"""``MxLinearMethod``: mxmoe-quantized dense linears (attention projections, shared experts) for vLLM 0.26.

Lifecycle:
  * ``create_weights``: one 2-D parameter per canonical tensor of the scheme (``qweight [N, K*B/8]`` uint8,
    ``scales``/``zeros [N, K/G]``, nested planes), N = sum of this rank's output partitions, K = this rank's input
    partition. vLLM's legacy loaders (``output_dim=0``, ``input_dim=1``) slice TP shards and place q/k/v or gate/up
    rows; a wrapper records every (tensor, shard) written.
  * ``process_weights_after_loading``: coverage check (error names the missing checkpoint tensors), then the one
    canonical -> kernel layout conversion (``kernel_adapter.prepare_linear``); the canonical parameters are dropped.
  * ``apply``: ``torch.ops.mxserve.linear(x, bias, key)``, an opaque custom op with a fake impl so torch.compile and
    CUDA graphs treat the layer like any other op.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.library import Library
from vllm.model_executor.layers.linear import LinearMethodBase, MergedColumnParallelLinear, QKVParallelLinear
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import direct_register_custom_op

from mxserve.vllm_plugin import kernel_adapter as ka
from mxserve.vllm_plugin import weight_stats
from mxserve.vllm_plugin.loading import UnexpectedTensorError, check_loaded, fill_dummy_, is_dummy_load
from mxserve_kernels.formats import WeightScheme, tensor_names
from mxserve_kernels.quant.reference import scale_torch_dtype

# key -> layer, for the custom op (same pattern as vLLM's moe_forward layer lookup).
_LAYERS: dict[str, torch.nn.Module] = {}
_lib = Library("mxserve", "FRAGMENT")


def canonical_shape(scheme: WeightScheme, suffix: str, n: int, k: int) -> tuple[tuple[int, int], torch.dtype]:
    """Shape and dtype of canonical tensor ``suffix`` of an [N, K] weight (``formats.py``)."""
    if suffix == "qweight":
        return (n, scheme.packed_cols(k)), torch.uint8
    if suffix.endswith("_weight") and suffix.startswith("plane"):
        return (n, k // 8), torch.uint8
    if suffix in ("scales", "zeros") or suffix.endswith("_scales"):
        return (n, k // scheme.group_size), scale_torch_dtype(scheme)
    raise ValueError(f"canonical_shape: unknown tensor suffix {suffix!r}")


def check_divisible(scheme: WeightScheme, k: int, tp: int, where: str) -> None:
    """Clear error when this rank's K cannot hold whole quantization groups (group size vs K/tp)."""
    if scheme.bits == 16:
        return
    if k % scheme.group_size or k % 8:
        raise ValueError(
            f"mxmoe: {where}: scheme {scheme.name} has group size {scheme.group_size}, which does not divide the "
            f"per-rank in_features K/tp = {k * tp}/{tp} = {k}; use a smaller --tensor-parallel-size or group size")


def _linear_op(x: torch.Tensor, bias: torch.Tensor | None, key: str) -> torch.Tensor:
    layer = _LAYERS[key]
    y = ka.linear_forward(x.reshape(-1, x.shape[-1]), layer._mx_lw, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear_fake(x: torch.Tensor, bias: torch.Tensor | None, key: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LAYERS[key]._mx_n))


direct_register_custom_op("linear", _linear_op, fake_impl=_linear_fake, target_lib=_lib,
                          dispatch_key="CompositeExplicitAutograd")


class MxLinearMethod(LinearMethodBase):
    """Linear method for one (possibly fused) mxmoe-quantized linear.

    Args:
        scheme: the one scheme shared by all fused shards.
        prefix: vLLM module name (``model.layers.0.self_attn.qkv_proj``).
        shard_names: checkpoint module names of the shards, in fused order (``[...q_proj, ...k_proj, ...v_proj]``).
        plan_cfg: the whole ``MxMoEConfig`` (weight metrics' quant-config info); None = no metrics.
    """

    def __init__(self, scheme: WeightScheme, prefix: str, shard_names: list[str], plan_cfg=None) -> None:
        super().__init__()
        self.scheme = scheme
        self.prefix = prefix
        self.shard_names = list(shard_names)
        self.plan_cfg = plan_cfg

    def ckpt_name(self, shard_id: Any, suffix: str) -> str:
        """Checkpoint name of tensor ``suffix`` of shard ``shard_id`` ("q"/"k"/"v", 0/1, or None = whole layer)."""
        idx = None if shard_id is None else "qkv".index(shard_id) if isinstance(shard_id, str) else int(shard_id)
        if idx is not None and idx < len(self.shard_names):
            mod = self.shard_names[idx]
        elif len(self.shard_names) == 1:
            mod = self.shard_names[0]
        else:
            mod = self.prefix
        return f"{mod}.{suffix}"

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        k, n = input_size_per_partition, sum(output_partition_sizes)
        tp = max(1, input_size // input_size_per_partition)
        check_divisible(self.scheme, k, tp, self.prefix)
        loader = extra_weight_attrs.pop("weight_loader")
        layer._mx_loaded = set()
        layer._mx_k, layer._mx_n = k, n
        nshards = len(output_partition_sizes)
        if isinstance(layer, QKVParallelLinear):
            ids: list[Any] = ["q", "k", "v"]
        elif isinstance(layer, MergedColumnParallelLinear):
            ids = list(range(nshards))
        else:
            ids = [None]
        layer._mx_expected = {}
        for suffix in tensor_names(self.scheme):
            shape, dtype = canonical_shape(self.scheme, suffix, n, k)
            p = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs,
                                 "weight_loader": self._tracking_loader(layer, loader, suffix, dtype)})
            layer.register_parameter(suffix, p)
            for sid in ids:
                layer._mx_expected[(suffix, sid)] = self.ckpt_name(sid, suffix)
        layer._mx_shard_ids = ids

    def _tracking_loader(self, layer: torch.nn.Module, loader, suffix: str, dtype: torch.dtype):
        def load(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
            name = self.ckpt_name(shard_id, suffix)
            if loaded_weight.dtype != dtype:
                raise UnexpectedTensorError(
                    f"mxmoe: {name}: dtype {loaded_weight.dtype} but scheme {self.scheme.name} stores {dtype}")
            if shard_id is None:
                loader(param, loaded_weight)
                layer._mx_loaded.update((suffix, s) for s in layer._mx_shard_ids)
            else:
                loader(param, loaded_weight, shard_id)
                layer._mx_loaded.add((suffix, shard_id))
        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not hasattr(layer, "_mx_expected"):
            return  # already processed
        tensors = {s: getattr(layer, s).data for s in tensor_names(self.scheme)}
        if is_dummy_load():
            fill_dummy_(self.scheme, tensors)
        else:
            check_loaded(self.prefix, layer._mx_expected, layer._mx_loaded)
        device = next(iter(tensors.values())).device
        if self.plan_cfg is not None:
            weight_stats.record_lazy(self.prefix, lambda: {weight_stats.precision_label(self.scheme): (
                sum(t.numel() * t.element_size() for t in tensors.values()), layer._mx_n * layer._mx_k,
                self.scheme.bits)}, self.plan_cfg)
        layer._mx_lw = ka.prepare_linear(self.scheme, tensors, k=layer._mx_k, device=device)
        ka.warm_kernels(layer._mx_lw)
        for s in tensor_names(self.scheme):
            delattr(layer, s)
        del layer._mx_expected, layer._mx_loaded
        layer._mx_key = f"{self.prefix}@{id(layer):x}"
        _LAYERS[layer._mx_key] = layer

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mxserve.linear(x, bias, layer._mx_key)
