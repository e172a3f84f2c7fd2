"""Transfer engine: the pinned host arena of nested planes, the GPU slot pool, a side copy stream and its events.

It owns no policy: ``TransferEngine.execute(plan)`` copies a ``PrefetchPlan``'s loads in plan order and
``wait(...)`` makes the compute stream wait for the planes a layer computes with.

Host arena: one pinned ``uint8`` buffer: a plain host allocation page-locked with ``cudaHostRegister`` (as vLLM's
KV offload does), because ``torch.empty(pin_memory=True)`` goes through the caching host allocator, which rounds
every block up to a power of two (a 16.3 GB Qwen3-30B-A3B arena would pin 32 GB); that allocator is only the logged
fallback when registration fails.
Region per plane level, base first: ``region[lv]`` is ``[L, E, plane_bytes[lv]]``; blob (l, e, lv) holds the
tensors of ``layout.specs[lv]`` at their offsets, in the GroupGEMM's runtime layout (``layout`` module docstring):
``write_expert`` takes canonical tensors and stores them K-major; ``expert_tensors`` converts back (copies).

GPU pool: ``[S, slot_bytes]`` uint8, allocated once (before vLLM profiles memory so the KV cache is sized around it).

Stream/event protocol (the vLLM PrefetchOffloader fork/join pattern): a plan that evicts waits for everything
queued on the compute stream before its copies (a reused slot may still be read by an earlier layer); each
executed plan records one event after its demand loads and one after its prefetch loads; ``wait`` puts
``wait_event`` for the events of the planes a layer needs on the compute stream. On a CPU device copies are
synchronous and events are None (used by the CPU tests of the bookkeeping).
"""
from __future__ import annotations

import logging
import weakref

import numpy as np
import torch

from mxserve.scheduler.layout import BASE, LEVELS, PlaneLayout
from mxserve.scheduler.policy import PrefetchPlan

_DT = {"uint8": torch.uint8, "int32": torch.int32, "bf16": torch.bfloat16, "fp16": torch.float16}
logger = logging.getLogger("mxserve.scheduler")


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:          # interpreter shutdown / CUDA already torn down: the process is exiting anyway
        pass


def alloc_pinned(nbytes: int) -> tuple[torch.Tensor, str, int]:
    """A page-locked uint8 [nbytes] host buffer without power-of-two rounding.

    Returns:
        (buffer, mode, pinned_bytes): mode ``"registered"`` (cudaHostRegister of a plain allocation; the caller
        must ``cudaHostUnregister`` it, see ``HostArena``) or ``"caching_allocator"`` (fallback, logged;
        ``pinned_bytes`` is then the allocator's power-of-two block).
    """
    buf = torch.empty(nbytes, dtype=torch.uint8)
    code, why = -1, ""
    try:
        err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
        code = int(getattr(err, "value", err))
    except Exception as e:     # no CUDA runtime binding
        why = repr(e)
    if code == 0 and buf.is_pinned():
        return buf, "registered", nbytes
    if code == 0:
        _unregister(buf.data_ptr())
    logger.warning("offload arena: cudaHostRegister of %d bytes failed (%s); falling back to the caching host "
                   "allocator, which pins %d bytes", nbytes, why or f"cudaError {code}", 1 << (nbytes - 1).bit_length())
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), "caching_allocator", 1 << (nbytes - 1).bit_length()


def plane_views(layout: PlaneLayout, blob: torch.Tensor, level: int) -> dict[str, torch.Tensor]:
    """Typed kernel-layout views of one plane blob.

    Args:
        layout: plane layout.
        blob: uint8 [>= plane_bytes[level]] (host arena blob or a GPU slot at ``slot_offset(level)``).
        level: 2 (base), 3 or 4.
    Returns:
        {"gate_up.qweight": [H/16, 2I] int32, "gate_up.scales": [H/G, 2I], ...} (``TensorSpec.kernel_shape`` /
        ``kernel_dtype``) views sharing ``blob``'s storage.
    """
    out = {}
    for sp in layout.specs[level]:
        out[sp.name] = blob[sp.offset:sp.offset + sp.nbytes].view(_DT[sp.kernel_dtype]).view(sp.kernel_shape)
    return out


def to_kernel(t: torch.Tensor) -> torch.Tensor:
    """Canonical ``[N, C]`` tensor -> its stored layout: uint8 codes -> int32 words ``[C/4, N]``, scales ``[C, N]``."""
    if t.dtype == torch.uint8:
        t = t.contiguous().view(torch.int32)
    return t.t().contiguous()


def to_canonical(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_kernel`` (a copy): int32 ``[C/4, N]`` -> uint8 ``[N, C]``; ``[C, N]`` scales -> ``[N, C]``."""
    t = t.t().contiguous()
    return t.view(torch.uint8) if t.dtype == torch.int32 else t


def canonical_views(layout: PlaneLayout, blob: torch.Tensor, level: int) -> dict[str, torch.Tensor]:
    """Canonical tensors (copies) of one plane blob: ``to_canonical`` of ``plane_views``."""
    return {name: to_canonical(v) for name, v in plane_views(layout, blob, level).items()}


class HostArena:
    """All offloaded experts' planes in one (pinned) host buffer.

    Args:
        layout: plane layout.
        num_layers / num_experts: L, E.
        pin: page-lock the buffer (needed for asynchronous H2D copies).
    """

    def __init__(self, layout: PlaneLayout, num_layers: int, num_experts: int, pin: bool = True) -> None:
        self.layout, self.L, self.E = layout, num_layers, num_experts
        self.region_off, off = {}, 0
        for lv in LEVELS:                                   # base region first
            self.region_off[lv] = off
            off += num_layers * num_experts * layout.plane_bytes[lv]
        self.nbytes = off
        if pin and off > 0:
            self.buf, self.pin_mode, self.pinned_bytes = alloc_pinned(off)
            if self.pin_mode == "registered":
                weakref.finalize(self, _unregister, self.buf.data_ptr())   # before the buffer itself is freed
        else:
            self.buf, self.pin_mode, self.pinned_bytes = torch.empty(off, dtype=torch.uint8), "none", 0

    def blob(self, layer: int, expert: int, level: int) -> torch.Tensor:
        """uint8 [plane_bytes[level]] view of one plane."""
        n = self.layout.plane_bytes[level]
        o = self.region_off[level] + (layer * self.E + expert) * n
        return self.buf[o:o + n]

    def write_expert(self, layer: int, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store one expert's canonical tensors (``"gate_up.qweight"``, ..., ``"down.plane4_scales"``).

        Raises:
            ValueError naming the tensor if one is missing or has the wrong dtype/shape.
        """
        for lv in LEVELS:
            views = plane_views(self.layout, self.blob(layer, expert, lv), lv)
            for sp in self.layout.specs[lv]:
                src, want = tensors.get(sp.name), _DT[sp.dtype]
                if src is None:
                    raise ValueError(f"offload arena: expert ({layer}, {expert}) is missing tensor {sp.name!r}")
                if src.dtype != want or tuple(src.shape) != tuple(sp.shape):
                    raise ValueError(f"offload arena: expert ({layer}, {expert}) tensor {sp.name!r} is {src.dtype} "
                                     f"{list(src.shape)}, expected {want} {list(sp.shape)}")
                views[sp.name].copy_(to_kernel(src))

    def expert_tensors(self, layer: int, expert: int, level: int = LEVELS[-1]) -> dict[str, torch.Tensor]:
        """Canonical tensors (copies) of planes 2..level of one expert (for references)."""
        out = {}
        for lv in LEVELS:
            if lv <= level:
                out.update(canonical_views(self.layout, self.blob(layer, expert, lv), lv))
        return out


class SlotPool:
    """The GPU slot pool: ``buf`` [S, slot_bytes] uint8."""

    def __init__(self, layout: PlaneLayout, num_slots: int, device: torch.device | str) -> None:
        self.layout, self.S = layout, num_slots
        self.buf = torch.empty((num_slots, layout.slot_bytes), dtype=torch.uint8, device=device)

    def check_slot(self, slot: int, what: str = "slot") -> int:
        """``slot`` as an int if it is in [0, S); raises otherwise.

        A -1 slot (``Residency`` / ``SlotView`` "not resident") must never index the pool: ``buf[-1]`` would
        silently read the last slot, i.e. another expert's planes.

        Raises:
            IndexError naming the slot and the pool size.
        """
        s = int(slot)
        if not 0 <= s < self.S:
            raise IndexError(f"offload slot pool: {what} {s} outside [0, {self.S}) (-1: plane not resident; "
                             f"was the plan applied to the Residency that was read?)")
        return s

    def blob(self, slot: int, level: int) -> torch.Tensor:
        """uint8 [plane_bytes[level]] view of plane ``level`` in slot ``slot`` (IndexError if not in [0, S))."""
        slot = self.check_slot(slot, f"plane {level} slot")
        o = self.layout.slot_offset(level)
        return self.buf[slot, o:o + self.layout.plane_bytes[level]]

    def expert_tensors(self, base_slot: int, upper_slot: int, level: int) -> dict[str, torch.Tensor]:
        """Canonical tensors (copies) of planes 2..level of an expert resident in (base_slot, upper_slot)."""
        out = canonical_views(self.layout, self.blob(base_slot, BASE), BASE)
        for lv in LEVELS[1:]:
            if lv <= level:
                out.update(canonical_views(self.layout, self.blob(upper_slot, lv), lv))
        return out


class TransferEngine:
    """Executes plans: H2D copies arena -> pool on a side stream, one event per (plan, demand|prefetch).

    Args:
        arena: host arena (pinned for overlap).
        pool: GPU slot pool.
    """

    def __init__(self, arena: HostArena, pool: SlotPool) -> None:
        self.arena, self.pool = arena, pool
        dev = pool.buf.device
        self.cuda = dev.type == "cuda"
        self.stream = torch.cuda.Stream(device=dev) if self.cuda else None
        self._events: dict[tuple[int, int, int], torch.cuda.Event] = {}   # (l, e, lv) -> copy-done event
        self.bytes_issued = 0
        self.timing = False                   # record (start, end) events around each copy batch (bench)
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def reset_timing(self) -> None:
        self._timed = []

    def busy_seconds(self) -> float:
        """Side-stream time spent copying since ``reset_timing`` (synchronizes the recorded events)."""
        total = 0.0
        for a, b in self._timed:
            b.synchronize()
            total += a.elapsed_time(b) * 1e-3
        return total

    def execute(self, plan: PrefetchPlan) -> None:
        """Issue ``plan``'s copies in order (asynchronously on CUDA)."""
        loads = plan.loads
        for op in plan.ops:
            self.pool.check_slot(op.slot, f"{op.kind} of ({op.layer}, {op.expert}) plane {op.level} into slot")
        for op in plan.ops:
            if op.kind == "evict":
                for lv in ((BASE,) if op.level == BASE else LEVELS[1:]):
                    self._events.pop((op.layer, op.expert, lv), None)
        if not loads:
            return
        if not self.cuda:
            for op in loads:
                self.pool.blob(op.slot, op.level).copy_(self.arena.blob(op.layer, op.expert, op.level))
                self.bytes_issued += op.nbytes
            return
        compute = torch.cuda.current_stream(self.pool.buf.device)
        if any(op.kind == "evict" for op in plan.ops):
            self.stream.wait_stream(compute)     # WAR: earlier layers may still read the reused slots
        with torch.cuda.stream(self.stream):
            for demand in (True, False):
                batch = [op for op in loads if op.demand == demand]
                if not batch:
                    continue
                if self.timing:
                    t0 = torch.cuda.Event(enable_timing=True)
                    t0.record(self.stream)
                for op in batch:
                    self.pool.blob(op.slot, op.level).copy_(self.arena.blob(op.layer, op.expert, op.level),
                                                            non_blocking=True)
                    self.bytes_issued += op.nbytes
                ev = torch.cuda.Event(enable_timing=self.timing)
                ev.record(self.stream)
                if self.timing:
                    self._timed.append((t0, ev))
                for op in batch:
                    self._events[(op.layer, op.expert, op.level)] = ev

    def wait(self, layer: int, run_level) -> None:
        """Make the current (compute) stream wait for the planes ``layer`` computes with.

        Args:
            layer: MoE layer.
            run_level: [E] ints (host), prefix each expert computes at (0: not routed).
        """
        if not self.cuda:
            return
        if not self._events:
            return
        compute = torch.cuda.current_stream(self.pool.buf.device)
        seen = set()
        for e in np.flatnonzero(np.asarray(run_level) > 0).tolist():      # routed experts only (not all E)
            rl = int(run_level[e])
            for lv in LEVELS:
                if lv <= rl:
                    ev = self._events.pop((layer, e, lv), None)
                    if ev is not None and id(ev) not in seen:
                        seen.add(id(ev))
                        compute.wait_event(ev)
