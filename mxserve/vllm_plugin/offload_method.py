"""Expert offloading in vLLM: ``OffloadMoEMethod`` (routed experts served from an ``ExpertCache`` slot pool) and the
compilation hook that keeps the MoE op out of CUDA graphs. Chosen by ``MxMoEQuantConfig`` when the checkpoint's
``quantization_config["offload"]`` is present and enabled (docs/offload.md, "vLLM integration contract").

Per model one ``OffloadRuntime`` (held by the quant config, so all MoE layers of a model share it):
  * ``process_weights_after_loading`` (inside ``load_model``, before vLLM profiles memory): the first layer creates
    the ``ExpertCache`` (pinned host arena + GPU slot pool, so the pool is part of the profiled weights), every layer
    writes its local experts' canonical nested tensors (``gate_up`` = row-concat(gate, up) of this TP rank, ``down``
    K-sliced) into the arena and drops its flat parameters; the last layer calls ``cache.preload()``.
  * ``apply``: ``ids = expert_map[topk_ids]``, look-ahead ``pred = topk(x @ W_router(l+1)^T)``,
    ``view = cache.ensure(l, ids, next_ids=pred)`` (one host sync), then ``fused_moe`` over the slot pool
    (``mxserve_kernels.moe.slot_weights`` views of the pool; ``einfo`` filled on the host from the view, one copy).
  * ``ensure`` cannot run under CUDA-graph capture: ``apply_compilation_hook`` makes ``vllm::moe_forward`` /
    ``vllm::moe_forward_shared`` splitting ops with ``cudagraph_mode=PIECEWISE`` (wrapping the platform's
    ``check_and_update_config``, which runs before vLLM resolves splitting ops), or falls back to eager (logged) when
    that is impossible and ``allow_eager_fallback`` is set; otherwise it raises.
  * Graph-input addresses (issue 7): vLLM's piecewise CUDA graphs bake the address of every piece input and never
    copy inputs (``CUDAGraphWrapper``; only ``VLLM_LOGGING_LEVEL=DEBUG`` asserts they match). vLLM's own splitting ops
    write into a buffer the previous piece allocated; ``moe_forward`` *returns* a fresh tensor, allocated eagerly on
    the capture stream at capture time and on the compute stream at replay, so the next piece would read a stale
    buffer. In a graph batch ``apply`` therefore returns a view of one static buffer (``OffloadRuntime.out``,
    ``[graph_rows, H]``, allocated at load), the same address at capture and at every replay.
    ``moe_forward_shared`` also returns the shared experts' output, which this method does not produce: models with
    shared experts (and dual-batch overlap) get the eager fallback instead of PIECEWISE graphs.
"""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from mxserve import envs
from mxserve.scheduler.config import OffloadConfig
from mxserve.scheduler.layout import LEVELS, PlaneLayout
from mxserve.vllm_plugin.loading import check_loaded, fill_dummy_, is_dummy_load
from mxserve.vllm_plugin.moe_method import MxMoEMethod, region_view
from mxserve_kernels.formats import WeightScheme

if TYPE_CHECKING:
    from mxserve_kernels.moe.weights import MoEWeights

logger = logging.getLogger("mxserve")

MOE_OPS = ("vllm::moe_forward", "vllm::moe_forward_shared")
KV_UPDATE_OPS = ("vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update")


class OffloadSetupError(ValueError):
    """The model / plan / vLLM configuration cannot be served with expert offloading; the message says why."""


def layer_order(prefixes) -> dict[str, int]:
    """MoE layer index of each experts-module prefix (sorted by the integers in the name: ``model.layers.3...``)."""
    key = lambda p: (tuple(int(x) for x in re.findall(r"\.(\d+)(?=\.|$)", p)), p)
    return {p: i for i, p in enumerate(sorted(prefixes, key=key))}


# ---- compilation hook ---------------------------------------------------------------------------------------------
def apply_compilation_hook(vllm_config, offload: OffloadConfig) -> str:
    """Make the MoE op run outside CUDA graphs (call before vLLM's ``set_splitting_ops_for_v1``).

    Args:
        vllm_config: the ``VllmConfig`` being finalised (platform ``check_and_update_config`` time).
        offload: the offload config (``allow_eager_fallback``).
    Returns:
        "piecewise" (MoE ops appended to the splitting ops, cudagraph_mode PIECEWISE), "eager" (no CUDA graphs at
        all: nothing to do, or the logged fallback) or "disabled" (offload off).
    Raises:
        OffloadSetupError: graphs would capture the MoE op and ``allow_eager_fallback`` is False.
    """
    from vllm.config.compilation import (
        CompilationConfig,
        CompilationMode,
        CUDAGraphMode,
    )

    if not offload.enabled:
        return "disabled"
    cc = vllm_config.compilation_config
    mc = vllm_config.model_config
    if (mc is not None and mc.enforce_eager) or cc.cudagraph_mode in (None, CUDAGraphMode.NONE):
        return "eager"
    why = ""
    shared = shared_experts_field(getattr(mc, "hf_config", None))
    if shared:
        why = (f"the model has shared experts ({shared}): vllm::moe_forward_shared returns their output as a fresh "
               "tensor, which a piecewise CUDA graph after the split would read at its capture-time address")
    elif getattr(getattr(vllm_config, "parallel_config", None), "enable_dbo", False):
        why = "dual-batch overlap interleaves two micro-batches through the one static MoE output buffer"
    elif cc.mode != CompilationMode.VLLM_COMPILE:
        why = f"compilation mode {cc.mode!r} has no graph splitting (breakable / full graphs only)"
    elif cc.pass_config.fuse_attn_quant and not cc.use_inductor_graph_partition:
        why = "attention+quant fusion replaces the splitting ops"
    if not why:
        if cc.splitting_ops is None:
            cc.splitting_ops = list(CompilationConfig._attention_ops) + list(KV_UPDATE_OPS)
        cc.splitting_ops = list(cc.splitting_ops) + [op for op in MOE_OPS if op not in cc.splitting_ops]
        if cc.cudagraph_mode != CUDAGraphMode.PIECEWISE:
            logger.info("mxmoe offload: cudagraph_mode %s -> PIECEWISE (the MoE op must run outside CUDA graphs)",
                        cc.cudagraph_mode.name)
            cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
        return "piecewise"
    if not offload.allow_eager_fallback:
        raise OffloadSetupError(f"mxmoe offload: cannot keep the MoE op out of CUDA graphs ({why}); pass "
                                "--enforce-eager or set quantization_config.offload.allow_eager_fallback")
    logger.warning("mxmoe offload: %s; falling back to eager mode (offload.allow_eager_fallback)", why)
    if mc is not None:
        mc.enforce_eager = True
    cc.mode = CompilationMode.NONE
    cc.cudagraph_mode = CUDAGraphMode.NONE
    return "eager"


def shared_experts_field(hf_config) -> str | None:
    """The HF config field that gives the model shared experts (``"n_shared_experts=2"``), or None.

    Args:
        hf_config: ``model_config.hf_config`` (its ``text_config`` is checked too), or None.
    """
    for cfg in (hf_config, getattr(hf_config, "text_config", None)):
        for name in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
            v = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return f"{name}={v}"
    return None


def graph_rows(vllm_config) -> int:
    """Largest token count of a CUDA-graph batch (rows of the static MoE output buffer); 0 without graphs.

    Args:
        vllm_config: the finalised ``VllmConfig`` (or any object with ``compilation_config`` / ``model_config``).
    """
    from vllm.config.compilation import CUDAGraphMode

    cc = getattr(vllm_config, "compilation_config", None)
    mc = getattr(vllm_config, "model_config", None)
    if cc is None or (mc is not None and getattr(mc, "enforce_eager", False)):
        return 0
    if cc.cudagraph_mode in (None, CUDAGraphMode.NONE):
        return 0
    sizes = [int(s) for s in (cc.cudagraph_capture_sizes or [])]
    return int(cc.max_cudagraph_capture_size or max(sizes, default=0))


def in_graph_batch() -> bool:
    """True inside a forward that vLLM captures or replays as CUDA graphs (``cudagraph_runtime_mode`` != NONE)."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return False
    mode = getattr(get_forward_context(), "cudagraph_runtime_mode", None)
    return mode not in (None, CUDAGraphMode.NONE)


def offload_config_update(vllm_config) -> str | None:
    """``apply_compilation_hook`` if ``vllm_config.quant_config`` is an mxmoe plan with an ``offload`` section.

    Returns:
        the hook's result, or None when the model does not offload.
    """
    qc = getattr(vllm_config, "quant_config", None)
    off = getattr(getattr(qc, "cfg", None), "offload", None)
    if off is None or getattr(qc, "get_name", lambda: "")() != "mxmoe":
        return None
    return apply_compilation_hook(vllm_config, OffloadConfig.from_dict(off))


def install_config_hook() -> None:
    """Wrap the current platform's ``check_and_update_config`` once: after it, apply ``apply_compilation_hook`` when
    the model's quant config is an mxmoe plan with an enabled ``offload`` section."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(cls, "_mxserve_offload_hook", False):
        return
    orig = cls.check_and_update_config

    def check_and_update_config(klass, vllm_config) -> None:
        orig(vllm_config)
        offload_config_update(vllm_config)

    cls.check_and_update_config = classmethod(check_and_update_config)
    cls._mxserve_offload_hook = True


def forward_context() -> dict | None:
    """``static_forward_context`` (layer name -> module) of the vLLM config being built, or None outside one."""
    from vllm.config import get_current_vllm_config
    try:
        return get_current_vllm_config().compilation_config.static_forward_context
    except Exception:  # noqa: BLE001 -- no current config (vLLM raises a bare error): look-ahead disabled
        logger.warning("mxmoe offload: no current vLLM config while building the MoE method; look-ahead disabled")
        return None


def _graph_out_shape() -> tuple[int, torch.dtype]:
    """(graph_rows, activation dtype) of the vLLM config being loaded; (0, bf16) outside one."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    if cfg is None:
        return 0, torch.bfloat16
    mc = cfg.model_config
    dtype = getattr(mc, "dtype", None) if mc is not None else None
    return graph_rows(cfg), dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


# ---- runtime ------------------------------------------------------------------------------------------------------
class OffloadRuntime:
    """One model's expert cache, shared by its ``OffloadMoEMethod`` layers.

    Args:
        cfg: offload config. order: experts prefix -> MoE layer index (L = len(order)).
        plans: experts prefix -> ``ExpertPlan`` (for targets and the layout).
    """

    def __init__(self, cfg: OffloadConfig, order: dict[str, int], plans: dict) -> None:
        self.cfg, self.order, self.plans = cfg, order, plans
        self.L = len(order)
        self.cache = None
        self.layout: PlaneLayout | None = None
        self.offsets = None
        self.wbf: torch.Tensor | None = None
        self.processed: set[int] = set()
        self.routers: dict[int, torch.Tensor | None] = {}
        self.caps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}    # layer -> per-projection prefix caps [E]
        self.caps_np: dict[int, np.ndarray] = {}                          # layer -> [2, E] the same caps, host
        self._einfo_host: torch.Tensor | None = None    # [L, 2, E, NFIELDS] int64 (pinned on CUDA)
        self._einfo_dev: torch.Tensor | None = None     # [L, 2, E, NFIELDS] int64 on the device
        self.out: torch.Tensor | None = None       # [graph_rows, H] static MoE output of graph batches

    def alloc_out(self, rows: int, hidden: int, dtype: torch.dtype, device) -> None:
        """Allocate the static output buffer ``[rows, hidden]`` (once, at load: before memory profiling and before
        any graph is captured, so its address never changes). rows 0: no buffer (no CUDA graphs)."""
        self.out = torch.empty((rows, hidden), dtype=dtype, device=device) if rows > 0 else None

    def graph_output(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` [T, H] copied into rows ``[0, T)`` of the static buffer; returns that view (same data_ptr for every
        T and layer: each layer's output is consumed by the next graph piece before the next MoE op runs).

        Raises:
            RuntimeError: no buffer, or T / H / dtype outside it (a graph batch the buffer was not sized for).
        """
        o = self.out
        if o is None or y.shape[0] > o.shape[0] or y.shape[1:] != o.shape[1:] or y.dtype != o.dtype:
            have = None if o is None else (list(o.shape), o.dtype)
            raise RuntimeError(f"mxmoe offload: CUDA-graph batch output {list(y.shape)} {y.dtype} does not fit the "
                               f"static MoE output buffer {have} (sized from max_cudagraph_capture_size at load)")
        out = o[: y.shape[0]]
        out.copy_(y)
        return out

    def schemes(self, prefix: str, global_ids: list[int]) -> tuple[WeightScheme, WeightScheme, np.ndarray,
                                                                   np.ndarray]:
        """Layout schemes (prefix 4) of gate_up / down, the [E_local] target prefixes of one layer (the larger of the
        two projections' prefixes) and the [2, E_local] per-projection prefixes; raises OffloadSetupError naming the
        expert for a non-nested expert or a group size / scale dtype that differs between experts."""
        plan = self.plans[prefix]
        tgt = np.zeros(len(global_ids), np.int8)
        caps = np.zeros((2, len(global_ids)), np.int64)
        first = None
        for loc, g in enumerate(global_ids):
            sg, sd = plan.gate_up[g], plan.down[g]
            for proj, s in (("gate_up", sg), ("down", sd)):
                if not s.nested:
                    raise OffloadSetupError(f"mxmoe offload: {prefix}.{g} {proj} scheme {s.name!r} is not nested; "
                                            "every offloaded expert needs an int2 base + planes (quantize --nested)")
            key = (sg.group_size, sg.scale_dtype, sd.group_size, sd.scale_dtype)
            if first is not None and key != first:
                raise OffloadSetupError(f"mxmoe offload: {prefix}.{g}: group size / scale dtype {key} differs from "
                                        f"the other experts' {first} (one slot layout per model)")
            first = key
            tgt[loc] = max(sg.bits, sd.bits)
            caps[:, loc] = (sg.bits, sd.bits)
        return (WeightScheme(4, sg.group_size, scale_dtype=sg.scale_dtype, nested=True),
                WeightScheme(4, sd.group_size, scale_dtype=sd.scale_dtype, nested=True), tgt, caps)

    def add_layer(self, prefix: str, hidden: int, inter: int, global_ids: list[int],
                  experts: list[dict[str, torch.Tensor]], device: torch.device) -> None:
        """Write one layer's local experts (canonical ``gate_up.*`` / ``down.*`` tensors) into the cache; creates
        the cache at the first layer and preloads after the last."""
        from mxserve.scheduler.expert_cache import ExpertCache

        l = self.order[prefix]
        sg, sd, tgt, caps = self.schemes(prefix, global_ids)
        layout = PlaneLayout(hidden=hidden, inter=inter, gate_up=sg, down=sd)
        if self.cache is None:
            target = np.full((self.L, len(global_ids)), 4, np.int8)
            self.cache = ExpertCache(self.cfg, layout, self.L, len(global_ids), target=target, device=device)
            self.layout = layout
            self.offsets = (layout.slot_offsets("gate_up"), layout.slot_offsets("down"))
            self.wbf = torch.zeros(1, dtype=torch.bfloat16, device=device)
            self.alloc_einfo(device)
            rows, dtype = _graph_out_shape()
            self.alloc_out(rows, hidden, dtype, device)
            logger.info("mxmoe offload: %d MoE layers x %d experts, %d slots of %d bytes (%.2f GiB GPU), arena "
                        "%.2f GiB (%s)", self.L, len(global_ids), self.cache.S, layout.slot_bytes,
                        self.cache.S * layout.slot_bytes / 2**30, self.cache.arena.nbytes / 2**30,
                        self.cache.arena.pin_mode)
        elif layout != self.layout or len(global_ids) != self.cache.E:
            raise OffloadSetupError(f"mxmoe offload: {prefix}: layer geometry / schemes differ from the first "
                                    "offloaded layer (one slot layout per model)")
        self.cache.target[l] = tgt
        self.caps[l] = (torch.from_numpy(caps[0]).to(device), torch.from_numpy(caps[1]).to(device))
        self.caps_np[l] = caps
        for loc, t in enumerate(experts):
            self.cache.write_expert(l, loc, t)
        self.processed.add(l)
        if len(self.processed) == self.L:
            self.cache.policy.target = self.cache.target
            self.cache.preload()


    def alloc_einfo(self, device) -> None:
        """Allocate the per-layer ``einfo`` buffers (host, pinned on CUDA, and device) once the cache exists."""
        from mxserve_kernels._common.layout import NFIELDS
        shape = (self.cache.L, 2, self.cache.E, NFIELDS)
        self._einfo_host = torch.zeros(shape, dtype=torch.int64, pin_memory=torch.device(device).type == "cuda")
        self._einfo_dev = torch.zeros(shape, dtype=torch.int64, device=device)

    def slot_weights(self, layer: int, view) -> MoEWeights:
        """``MoEWeights`` of ``layer`` over the slot pool for the ``SlotView`` that ``ensure`` just returned.

        Both projections' ``einfo`` are filled on the host from the view's host tables (``slot_tables``) and moved
        in one asynchronous copy, instead of ~35 small device ops of ``slot_einfo`` per layer. The pinned row of a
        layer is rewritten only at that layer's next ``ensure``, whose host sync orders it after this copy.
        """
        from mxserve.scheduler.slot_tables import fill_slot_einfo
        from mxserve_kernels.moe.slot_weights import slot_moe_weights
        if self._einfo_host is None:
            self.alloc_einfo(self.wbf.device)
        host, caps = self._einfo_host[layer], self.caps_np.get(layer)
        arr = host.numpy()
        for j, offs in enumerate(self.offsets):
            fill_slot_einfo(arr[j], view.base_slot, view.upper_slot, view.run_level, offs,
                            None if caps is None else caps[j])
        dev = self._einfo_dev[layer]
        dev.copy_(host, non_blocking=True)
        return slot_moe_weights(view.pool.buf, view.tables, *self.offsets, wbf=self.wbf, einfo=(dev[0], dev[1]))

    def warm_weights(self) -> MoEWeights:
        """Slot-pool ``MoEWeights`` with every expert routed at the top run level (slots 0: in bounds, contents
        irrelevant) for the kernel warm-up: the kinds mask is ``SLOT_KINDS`` whatever the run levels, residency or
        caps, so the Triton keys of the offload path depend on T only, exactly as for a resident layer."""
        from mxserve_kernels.moe.slot_weights import slot_moe_weights
        E = self.cache.E
        tables = torch.zeros((3, E), dtype=torch.int32, device=self.wbf.device)
        tables[2] = max(LEVELS)
        return slot_moe_weights(self.cache.pool.buf, tables, *self.offsets, wbf=self.wbf)

    def warm(self, top_k: int, expert_map: torch.Tensor | None) -> int:
        """Compile every Triton binary the offload path can launch at T <= max_num_batched_tokens, at load
        (``kernel_adapter.warm_kernels``; no-op off the GPU, with MXSERVE_KERNEL_WARMUP=0 or an empty pool).
        Without it the first batches of each new T bucket compiled ``grouped_gemm_kernel`` / ``moe_align_kernel``
        inside serving (vLLM's JIT monitor warned during the timed windows). Returns the forwards run."""
        from mxserve.vllm_plugin import kernel_adapter as ka
        if self.cache is None or self.cache.S == 0:
            return 0
        return ka.warm_kernels(self.warm_weights(), top_k=top_k, expert_map=expert_map)


class OffloadMoEMethod(MxMoEMethod):
    """``MxMoEMethod`` whose experts live in the model's ``OffloadRuntime`` (nested schemes only).

    Args:
        plan, prefix, moe, plan_cfg: as ``MxMoEMethod``.
        runtime: the model's shared ``OffloadRuntime``.
        forward_context: ``compilation_config.static_forward_context`` (layer name -> MoE runner), to find the
            next layer's router for look-ahead; None disables look-ahead.
    """

    def __init__(self, plan, prefix: str, moe, runtime: OffloadRuntime, plan_cfg=None,
                 forward_context: dict | None = None) -> None:
        super().__init__(plan, prefix, moe, plan_cfg=plan_cfg)
        self.runtime = runtime
        self.layer_idx = runtime.order[prefix]
        self._ctx = forward_context
        self._next_prefix = next((p for p, i in runtime.order.items() if i == self.layer_idx + 1), None)
        self._router: torch.Tensor | None | bool = False     # False: not looked up yet

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not hasattr(layer, "_mx_layout"):
            return
        dummy = is_dummy_load()
        if not dummy:
            check_loaded(self.prefix, self._expected(layer), layer._mx_loaded)
        H, Ip = layer._mx_dims
        gids = layer._mx_local_to_global
        self.runtime.schemes(self.prefix, gids)             # named error before touching any tensor
        experts: list[dict[str, torch.Tensor]] = [{} for _ in gids]
        device = None
        for proj, name, plan in (("w13", "gate_up", self.plan.gate_up), ("w2", "down", self.plan.down)):
            for local, g in enumerate(gids):
                regs = layer._mx_layout[proj][local]
                tensors = {suf: region_view(getattr(layer, f"{proj}_{suf}").data, r) for suf, r in regs.items()}
                if dummy:
                    fill_dummy_(plan[g], tensors)
                experts[local].update({f"{name}.{suf}": t for suf, t in tensors.items()})
                device = next(iter(tensors.values())).device
        self.runtime.add_layer(self.prefix, H, Ip, gids, experts, device)
        for name in layer._mx_params:
            delattr(layer, name)
        del layer._mx_layout, layer._mx_loaded
        if len(self.runtime.processed) == self.runtime.L:
            self.runtime.warm(self.moe.experts_per_token, getattr(layer, "expert_map", None))

    def _next_router(self) -> torch.Tensor | None:
        """The next MoE layer's router weight [E, H] (None: last layer, no context, or no gate in the runner)."""
        if self._router is False:
            runner = (self._ctx or {}).get(self._next_prefix) if self._next_prefix else None
            gate = getattr(runner, "gate", None)
            self._router = getattr(gate, "weight", None)
            self.runtime.routers[self.layer_idx + 1] = self._router
        return self._router

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], topk_weights/topk_ids [T, K] (global ids) -> [T, H] partial sum of this rank's experts."""
        from mxserve_kernels.moe import fused_moe, reference

        rt = self.runtime
        emap = layer.expert_map
        ids = topk_ids if emap is None else emap.to(torch.int64)[topk_ids.to(torch.int64)]
        pred = None
        w_next = self._next_router()
        if w_next is not None and rt.cfg.prefetch and x.shape[0] > 0:
            pred = torch.topk(x.to(w_next.dtype) @ w_next.t(), topk_ids.shape[1], dim=-1).indices
            if emap is not None:
                pred = emap.to(torch.int64)[pred]
        view = rt.cache.ensure(self.layer_idx, ids, next_ids=pred)
        w = rt.slot_weights(self.layer_idx, view)
        disabled = envs.disabled_kernels()
        fn = reference.fused_moe if ("triton_moe" in disabled or "all" in disabled) else fused_moe
        y = fn(x, w, topk_weights, topk_ids, activation="silu", expert_map=emap)
        # the MoE op is a graph split point: a graph batch must hand the next piece its capture-time address
        return rt.graph_output(y) if in_graph_batch() else y
