"""Byte layout of one offloaded expert's nested planes (host arena blobs and GPU slots).

An expert has two projections, ``gate_up`` ``[2I, H]`` and ``down`` ``[H, I]`` (``[N, K]`` each), stored in a nested
scheme of ``mxserve_kernels.formats`` (int2 asym base + 1-bit residual planes 3 and 4). Its bytes split into
*planes* ("levels"): level 2 = the base (``qweight, scales, zeros`` of both projections), level p in (3, 4) =
``plane{p}_weight, plane{p}_scales`` of both projections. A plane is one contiguous blob; each tensor inside starts
at a ``ALIGN``-byte offset (vector loads in the GroupGEMM), except ``zeros``, which directly follows ``scales``.

Blobs hold the GroupGEMM's runtime layout (``mxserve_kernels/_common/layout.py``), not the canonical one, so the
GPU slot pool IS the kernel's ``qw / pw / meta`` buffer (``mxserve_kernels.moe.slot_weights``): a canonical
``[N, C]`` uint8 tensor (``qweight``, ``plane{p}_weight``) is stored as K-major int32 words ``[C/4, N]``, a
canonical ``[N, K/G]`` scale / zero tensor as ``[K/G, N]``; ``scales`` + ``zeros`` form the kernel's ``meta``
``[2, K/G, N]``. ``TensorSpec`` keeps the canonical name / dtype / shape (what ``write_expert`` takes) and gives the
stored ``kernel_shape`` / ``kernel_dtype``. Planes 3 and 4 have the same internal layout, so in an upper slot plane 4
of every tensor is exactly ``plane_bytes[3]`` bytes after plane 3 (the kernel's PWSTEP / PMSTEP).

GPU slots are all ``slot_bytes`` long and hold either a base blob (at offset 0) or an *upper* blob: plane 3 at
offset 0 and plane 4 at ``upper_offset[4]``. With 16-bit scales a base is exactly as large as planes 3 + 4, so one
slot size fits both without waste (modulo alignment).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mxserve_kernels.formats import NESTED_BASE_BITS, NESTED_MAX_BITS, WeightScheme

ALIGN = 128
BASE = NESTED_BASE_BITS                      # level of the base plane (2)
LEVELS = tuple(range(NESTED_BASE_BITS, NESTED_MAX_BITS + 1))  # (2, 3, 4)
UPPER = LEVELS[1:]                           # (3, 4): planes sharing the upper slot
PROJS = ("gate_up", "down")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorSpec:
    """One tensor inside a plane blob: ``blob[offset : offset + nbytes].view(dtype).view(shape)``."""

    name: str          # e.g. "gate_up.qweight", "down.plane3_scales"
    dtype: str         # "uint8", "bf16" or "fp16"
    shape: tuple[int, int]
    offset: int

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * (1 if self.dtype == "uint8" else 2)

    @property
    def kernel_dtype(self) -> str:
        """Stored dtype: packed codes as int32 words, scales unchanged."""
        return "int32" if self.dtype == "uint8" else self.dtype

    @property
    def kernel_shape(self) -> tuple[int, int]:
        """Stored (K-major) shape: ``[C/4, N]`` int32 for packed ``[N, C]`` uint8, ``[K/G, N]`` for ``[N, K/G]``."""
        n, c = self.shape
        return (c // 4, n) if self.dtype == "uint8" else (c, n)


@dataclass(frozen=True)
class PlaneLayout:
    """Plane blobs of every offloaded expert (uniform over layers and experts).

    Args:
        hidden: H.
        inter: I (expert intermediate size).
        gate_up: nested scheme of the fused gate/up projection ``[2I, H]``.
        down: nested scheme of the down projection ``[H, I]``.
    """

    hidden: int
    inter: int
    gate_up: WeightScheme
    down: WeightScheme
    specs: dict[int, tuple[TensorSpec, ...]] = field(init=False, repr=False)
    plane_bytes: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        specs: dict[int, list[TensorSpec]] = {lv: [] for lv in LEVELS}
        offs = {lv: 0 for lv in LEVELS}
        for proj, scheme, (n, k) in (("gate_up", self.gate_up, (2 * self.inter, self.hidden)),
                                     ("down", self.down, (self.hidden, self.inter))):
            if not scheme.nested:
                raise ValueError(f"offload layout: {proj} scheme {scheme.name!r} is not nested (needs int2 base + planes)")
            scheme.check_shape(n, k, where=f"offload layout {proj}")
            g = scheme.num_groups(k)
            sd = scheme.scale_dtype
            tensors = {BASE: [("qweight", "uint8", (n, scheme.packed_cols(k))), ("scales", sd, (n, g)),
                              ("zeros", sd, (n, g))]}
            for p in UPPER:
                tensors[p] = [(f"plane{p}_weight", "uint8", (n, k // 8)), (f"plane{p}_scales", sd, (n, g))]
            for lv, items in tensors.items():
                for name, dt, shape in items:
                    spec = TensorSpec(f"{proj}.{name}", dt, shape, offs[lv])
                    specs[lv].append(spec)
                    # zeros directly after scales: the kernel reads meta [2, K/G, N] (zero row at + (K/G)*N)
                    offs[lv] = offs[lv] + spec.nbytes if name == "scales" else _align(offs[lv] + spec.nbytes)
        object.__setattr__(self, "specs", {lv: tuple(v) for lv, v in specs.items()})
        object.__setattr__(self, "plane_bytes", dict(offs))

    # ---- sizes -----------------------------------------------------------------------------------------------
    @property
    def upper_offset(self) -> dict[int, int]:
        """Byte offset of upper plane p inside an upper slot."""
        out, off = {}, 0
        for p in UPPER:
            out[p] = off
            off += self.plane_bytes[p]
        return out

    @property
    def upper_bytes(self) -> int:
        return sum(self.plane_bytes[p] for p in UPPER)

    @property
    def slot_bytes(self) -> int:
        return max(self.plane_bytes[BASE], self.upper_bytes)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert with all planes."""
        return sum(self.plane_bytes.values())

    def bytes_to_level(self, level: int) -> int:
        """Bytes of planes 2..level of one expert (0 for level 0)."""
        return sum(self.plane_bytes[lv] for lv in LEVELS if lv <= level)

    def slot_offset(self, level: int) -> int:
        """Offset of plane ``level`` in its slot (base and plane 3 at 0)."""
        return 0 if level == BASE else self.upper_offset[level]

    def spec(self, level: int, name: str) -> TensorSpec:
        """The spec of tensor ``name`` (e.g. ``"down.plane3_scales"``) in plane ``level``; KeyError otherwise."""
        for sp in self.specs[level]:
            if sp.name == name:
                return sp
        raise KeyError(f"offload layout: no tensor {name!r} in plane {level}")

    def slot_offsets(self, proj: str):
        """Byte offsets the GroupGEMM needs to read projection ``proj`` ("gate_up" | "down") from the slot pool.

        Returns:
            ``mxserve_kernels.moe.slot_weights.SlotOffsets`` (base blob: codes, meta; upper slot: plane-3 words and
            scales; plane 4 of both at ``+ plane_bytes[3]``).
        """
        from mxserve_kernels.moe.slot_weights import SlotOffsets
        scheme = self.gate_up if proj == "gate_up" else self.down
        n, k = (2 * self.inter, self.hidden) if proj == "gate_up" else (self.hidden, self.inter)
        for p in UPPER[1:]:        # the kernel steps from plane 3 to plane p by (p - 3) * plane_bytes[3]
            for t in ("weight", "scales"):
                if (self.slot_offset(p) + self.spec(p, f"{proj}.plane{p}_{t}").offset
                        != (p - 3) * self.plane_bytes[3] + self.spec(3, f"{proj}.plane3_{t}").offset):
                    raise AssertionError(f"offload layout: plane {p} {proj}.{t} is not one plane step after plane 3")
        return SlotOffsets(n=n, k=k, group_size=scheme.group_size, scale_dtype=scheme.scale_dtype,
                           slot_bytes=self.slot_bytes, qweight=self.spec(BASE, f"{proj}.qweight").offset,
                           meta=self.spec(BASE, f"{proj}.scales").offset,
                           plane_words=self.spec(3, f"{proj}.plane3_weight").offset,
                           plane_scales=self.spec(3, f"{proj}.plane3_scales").offset,
                           plane_step=self.plane_bytes[3])


def qwen3_30b_a3b_layout(group_size: int = 128) -> tuple[PlaneLayout, dict[str, int]]:
    """Layout + geometry of Qwen3-30B-A3B experts (48 layers, E=128, top-8, H=2048, I=768) at int2 nested4."""
    s = WeightScheme(bits=NESTED_MAX_BITS, group_size=group_size, nested=True)
    geo = {"layers": 48, "experts": 128, "top_k": 8, "hidden": 2048, "inter": 768}
    return PlaneLayout(hidden=geo["hidden"], inter=geo["inter"], gate_up=s, down=s), geo
