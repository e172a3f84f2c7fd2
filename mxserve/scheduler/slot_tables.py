"""Host-side ``einfo`` of the offload slot pool: the numpy twin of ``mxserve_kernels.moe.slot_weights.slot_einfo``.

``slot_einfo`` builds the GroupGEMM's per-expert table on the device from ``[3, E]`` residency tables with ~17 small
torch ops per projection: ~35 kernel launches (each a few microseconds of host time) per MoE layer and step. The
offload runtime already holds the same tables on the host (``SlotView.base_slot / upper_slot / run_level``, right
after ``ExpertCache.ensure``'s host sync), so it fills both projections' tables here with a few vectorised numpy
ops into a pinned buffer and moves them with ONE asynchronous copy (``OffloadRuntime.slot_weights``). Equality with
``slot_einfo`` is tested field by field (``tests/unit/test_offload_slot_tables.py``).
"""
from __future__ import annotations

import numpy as np

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
)
from mxserve_kernels.moe.slot_weights import SlotOffsets


def fill_slot_einfo(out: np.ndarray, base_slot: np.ndarray, upper_slot: np.ndarray, run_level: np.ndarray,
                    offs: SlotOffsets, cap: np.ndarray | None = None) -> np.ndarray:
    """Write one projection's ``einfo`` (what ``slot_einfo`` computes on the device) into ``out``.

    Args:
        out: int64 [E, NFIELDS] (e.g. a view of a pinned buffer); every field is written.
        base_slot / upper_slot: [E] int slots (-1: none). run_level: [E] int prefix (0: not routed, 2..4).
        offs: the projection's offsets. cap: optional [E] int per-expert prefix cap of this projection.
    Returns:
        ``out``.
    Raises:
        ValueError: ``out`` is not int64 [E, NFIELDS].
    """
    e = len(run_level)
    if out.dtype != np.int64 or out.shape != (e, NFIELDS):
        raise ValueError(f"fill_slot_einfo: out must be int64 [{e}, {NFIELDS}], got {out.dtype} {list(out.shape)}")
    base = np.maximum(np.asarray(base_slot, np.int64), 0)
    upper = np.maximum(np.asarray(upper_slot, np.int64), 0)
    lv = np.asarray(run_level, np.int64)
    if cap is not None:
        lv = np.where(lv > 0, np.minimum(lv, np.asarray(cap, np.int64)), lv)
    esz = offs.meta_dtype.itemsize
    routed = lv >= 2
    out[:, F_KIND] = np.where(lv >= 3, KIND_NESTED, np.where(routed, KIND_INT, KIND_NONE))
    out[:, F_BITS] = np.where(routed, lv, 0)
    out[:, F_GROUP] = offs.group_size
    out[:, F_QOFF] = (base * offs.slot_bytes + offs.qweight) // (4 * OFF_UNIT)
    out[:, F_POFF] = (upper * offs.slot_bytes + offs.plane_words) // (4 * OFF_UNIT)
    out[:, F_MOFF] = (base * offs.slot_bytes + offs.meta) // (esz * OFF_UNIT)
    out[:, F_NPLANES] = np.clip(lv - 2, 0, 2)
    out[:, F_PMOFF] = (upper * offs.slot_bytes + offs.plane_scales) // esz
    out[:, F_PWSTEP] = offs.plane_step // 4
    out[:, F_PMSTEP] = offs.plane_step // esz
    untouched = [f for f in range(NFIELDS) if f not in (F_KIND, F_BITS, F_GROUP, F_QOFF, F_POFF, F_MOFF, F_NPLANES,
                                                        F_PMOFF, F_PWSTEP, F_PMSTEP)]
    out[:, untouched] = 0
    return out
