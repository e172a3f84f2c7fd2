"""Grouped-GEMM weights over an expert-offload slot pool: ``einfo`` built on the device from the residency tables.

The offload runtime (``mxserve.scheduler``) keeps each resident expert's nested planes in a GPU slot pool
``buf [S, slot_bytes]`` uint8, already in the runtime layout of ``_common/layout.py``: a *base* slot holds, per
projection, the int2 code words ``[K/16, N]`` int32 and ``meta [2, K/G, N]`` (scale, zero); an *upper* slot holds the
plane-3 sign words ``[K/32, N]`` and plane-3 scales ``[K/G, N]`` per projection, and plane 4 of both exactly
``plane_step`` bytes later. So the pool IS the kernel's ``qw / pw / meta`` buffer; only ``einfo`` changes per step:

  * ``QOFF = (base_slot * slot_bytes + qweight) / 4``, ``MOFF = (base_slot * slot_bytes + meta) / esz``
    (OFF_UNIT units), ``POFF = (upper_slot * slot_bytes + plane_words) / 4`` (OFF_UNIT units),
  * ``PMOFF = (upper_slot * slot_bytes + plane_scales) / esz``, ``PWSTEP = plane_step / 4``,
    ``PMSTEP = plane_step / esz`` (elements),
  * run level 0: ``KIND_NONE`` (not routed); 2: ``KIND_INT`` 2-bit (the base alone); 3 / 4: ``KIND_NESTED`` with 1 / 2
    planes. The kinds mask is the static ``int2 | nested+1 | nested+2``: no recompilation when run levels change.

``slot_einfo`` is plain torch on the tables' device with fixed shapes: no host sync (CUDA-graph capturable).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxserve_kernels._common.layout import (
    F_BITS,
    F_GROUP,
    F_KIND,
    F_MOFF,
    F_NPLANES,
    F_PMOFF,
    F_PMSTEP,
    F_POFF,
    F_PWSTEP,
    F_QOFF,
    KIND_INT,
    KIND_NESTED,
    KIND_NONE,
    NFIELDS,
    OFF_UNIT,
    PackedWeights,
    kind_bit,
)
from mxserve_kernels.moe.weights import MoEWeights

_SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# int2 base alone, nested + 1 plane, nested + 2 planes
SLOT_KINDS = kind_bit(KIND_INT, 2, 0) | kind_bit(KIND_NESTED, 3, 1) | kind_bit(KIND_NESTED, 4, 2)


@dataclass(frozen=True)
class SlotOffsets:
    """Where one projection ``[N, K]`` lives inside a slot (byte offsets; see the module docstring).

    Attributes:
        n, k: weight shape (out, in features). group_size: G. scale_dtype: "bf16" | "fp16".
        slot_bytes: bytes per slot. qweight / meta: offsets in a base slot. plane_words / plane_scales: plane-3
            offsets in an upper slot. plane_step: bytes from plane 3 to plane 4 of the same tensor.
    """

    n: int
    k: int
    group_size: int
    scale_dtype: str
    slot_bytes: int
    qweight: int
    meta: int
    plane_words: int
    plane_scales: int
    plane_step: int

    def __post_init__(self) -> None:
        esz = 2
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"SlotOffsets.scale_dtype: expected one of {list(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        for name, unit in (("slot_bytes", 4 * OFF_UNIT), ("qweight", 4 * OFF_UNIT), ("meta", esz * OFF_UNIT),
                           ("plane_words", 4 * OFF_UNIT), ("plane_scales", esz), ("plane_step", 4)):
            if getattr(self, name) % unit:
                raise ValueError(f"SlotOffsets.{name} = {getattr(self, name)} must be a multiple of {unit} bytes")

    @property
    def meta_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]


def slot_einfo(tables: torch.Tensor, offs: SlotOffsets, cap: torch.Tensor | None = None) -> torch.Tensor:
    """``einfo`` of the slot pool for one projection, on ``tables``' device, without a host sync.

    Args:
        tables: [3, E] int32: base slot, upper slot (-1: none), run level (0: not routed, 2..4) per expert.
        offs: the projection's offsets.
        cap: optional [E] int (device) highest prefix of this projection per expert (the plan's bits when gate_up
            and down of an expert have different prefixes); the projection runs at ``min(run level, cap)``.
    Returns:
        einfo int64 [E, NFIELDS].
    """
    if tables.dim() != 2 or tables.shape[0] != 3:
        raise ValueError(f"slot_einfo: tables must be [3, E], got {list(tables.shape)}")
    t = tables.to(torch.int64)
    base, upper, lv = t[0].clamp_min(0), t[1].clamp_min(0), t[2]
    if cap is not None:
        lv = torch.where(lv > 0, torch.minimum(lv, cap.to(lv.device, torch.int64)), lv)
    esz = offs.meta_dtype.itemsize
    info = torch.zeros((t.shape[1], NFIELDS), dtype=torch.int64, device=tables.device)
    routed = lv >= 2
    info[:, F_KIND] = torch.where(lv >= 3, KIND_NESTED, torch.where(routed, KIND_INT, KIND_NONE))
    info[:, F_BITS] = torch.where(routed, lv, 0)
    info[:, F_GROUP] = offs.group_size
    info[:, F_QOFF] = (base * offs.slot_bytes + offs.qweight) // (4 * OFF_UNIT)
    info[:, F_MOFF] = (base * offs.slot_bytes + offs.meta) // (esz * OFF_UNIT)
    info[:, F_POFF] = (upper * offs.slot_bytes + offs.plane_words) // (4 * OFF_UNIT)
    info[:, F_NPLANES] = (lv - 2).clamp(0, 2)
    info[:, F_PMOFF] = (upper * offs.slot_bytes + offs.plane_scales) // esz
    info[:, F_PWSTEP] = offs.plane_step // 4
    info[:, F_PMSTEP] = offs.plane_step // esz
    return info


def slot_projection(buf: torch.Tensor, tables: torch.Tensor, offs: SlotOffsets,
                    wbf: torch.Tensor | None = None, cap: torch.Tensor | None = None,
                    einfo: torch.Tensor | None = None) -> PackedWeights:
    """One projection of every expert, read straight from the slot pool.

    Args:
        buf: [S, slot_bytes] uint8 slot pool (contiguous).
        tables: [3, E] int32 residency tables (``ExpertCache.ensure(...).tables``).
        offs: the projection's offsets.
        wbf: a 1-element bf16 placeholder (no bf16 experts here); allocated if None.
        cap: optional [E] per-expert prefix cap of this projection (``slot_einfo``).
        einfo: optional precomputed [E, NFIELDS] int64 table on ``buf``'s device, equal to
            ``slot_einfo(tables, offs, cap)`` (the offload runtime fills it on the host: no per-field launches).
    Returns:
        PackedWeights whose ``qw``/``pw``/``meta`` are views of ``buf`` (no copy) and ``kinds`` = ``SLOT_KINDS``.
    """
    if buf.dim() != 2 or buf.dtype != torch.uint8 or buf.shape[1] != offs.slot_bytes or not buf.is_contiguous():
        raise ValueError(f"slot_projection: buf must be a contiguous uint8 [S, {offs.slot_bytes}], got "
                         f"{buf.dtype} {list(buf.shape)}")
    flat = buf.view(-1)
    words = flat.view(torch.int32)
    if wbf is None:
        wbf = torch.zeros(1, dtype=torch.bfloat16, device=buf.device)
    return PackedWeights(qw=words, pw=words, meta=flat.view(offs.meta_dtype), wbf=wbf,
                         einfo=slot_einfo(tables, offs, cap) if einfo is None else einfo, n=offs.n, k=offs.k,
                         kinds=SLOT_KINDS)


def slot_moe_weights(buf: torch.Tensor, tables: torch.Tensor, gate_up: SlotOffsets, down: SlotOffsets,
                     wbf: torch.Tensor | None = None,
                     caps: tuple[torch.Tensor, torch.Tensor] | None = None,
                     einfo: tuple[torch.Tensor, torch.Tensor] | None = None) -> MoEWeights:
    """``MoEWeights`` of one layer over the slot pool (for ``fused_moe``).

    Args:
        buf: [S, slot_bytes] uint8 slot pool. tables: [3, E] int32. gate_up: offsets of the [2I, H] projection.
        down: offsets of the [H, I] projection. wbf: optional shared 1-element bf16 placeholder.
        caps: optional ([E], [E]) per-expert prefix caps of gate_up and down (``slot_einfo``).
        einfo: optional precomputed ([E, NFIELDS], [E, NFIELDS]) tables of gate_up and down (``slot_projection``);
            ``tables`` and ``caps`` are then not read.
    Returns:
        MoEWeights (hidden = H, inter = I).
    """
    if gate_up.n != 2 * down.k or gate_up.k != down.n:
        raise ValueError(f"slot_moe_weights: gate_up [{gate_up.n}, {gate_up.k}] and down [{down.n}, {down.k}] are "
                         f"not [2I, H] and [H, I]")
    if wbf is None:
        wbf = torch.zeros(1, dtype=torch.bfloat16, device=buf.device)
    cg, cd = caps if caps is not None else (None, None)
    eg, ed = einfo if einfo is not None else (None, None)
    return MoEWeights(slot_projection(buf, tables, gate_up, wbf, cg, eg),
                      slot_projection(buf, tables, down, wbf, cd, ed), hidden=down.n, inter=down.k)
