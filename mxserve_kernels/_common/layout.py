"""Runtime (kernel) weight layout: the ONE conversion from canonical tensors (``formats.py``) to what the GEMMs read.

One ``PackedWeights`` holds one projection of E experts (E = 1 for a dense linear), each expert with its own scheme.
Every per-expert weight ``W [N, K]`` is stored K-major so that tile loads are contiguous along N:

  * ``qw``   int32, flat; expert e at ``einfo[e, QOFF]``: ``[K*B/32, N]`` -- word ``(kw, n)`` is the little-endian
    int32 view of canonical bytes ``qweight[n, 4*kw : 4*kw+4]`` (codes ``k = kw*32/B + j`` in bits ``[j*B, (j+1)*B)``).
    3-bit experts store a 2-bit plane here (``q & 3``) and the high bit in ``pw``; nested experts store the int2 base.
  * ``pw``   int32, flat; expert e at ``einfo[e, POFF]``: P 1-bit planes ``[K/32, N]`` (3-bit high bit, or the nested
    residual sign planes 3..prefix), packed like ``qw`` with B = 1; plane i starts ``i * einfo[e, PWSTEP]`` words
    after plane 0 (``pack_projection``: ``(K/32)*N``, i.e. contiguous ``[P, K/32, N]``).
  * ``meta`` flat, dtype ``meta_dtype``; expert e at ``einfo[e, MOFF]``: ``[2, K/G, N]`` = scale, zero; nested plane
    scales at ``einfo[e, PMOFF]`` (plane i at ``PMOFF + i*PMSTEP``, each ``[K/G, N]``). ``pack_projection`` stores
    them right after scale/zero (``PMOFF = MOFF + 2*(K/G)*N``, ``PMSTEP = (K/G)*N``, i.e. ``[2 + P, K/G, N]``); the
    expert-offload slot pool (``moe.offload_weights``) points them into another slot. Symmetric schemes store ``zero = -2**(B-1) * scale`` (exact), so every integer kind dequantizes as
    ``q * scale + zero`` (+ ``sum_p (2*bit_p - 1) * plane_scale_p`` for nested). ``meta_dtype`` is the common
    canonical scale dtype, or fp32 when experts mix bf16 and fp16 scales (both convert exactly).
  * ``wbf``  bf16, flat; expert e at ``einfo[e, WOFF]``: ``[K, N]`` (bf16 passthrough experts).
  * ``einfo`` int64 ``[E, NFIELDS]``: kind, bits, group size, offsets QOFF/POFF/MOFF/WOFF in units of ``OFF_UNIT`` =
    16 elements (each expert's data is zero-padded to 16 elements so the next one starts aligned), planes, then
    PMOFF/PWSTEP/PMSTEP in plain elements (see the ``F_*`` constants).

The torch dequantizer ``dequant_expert`` here is bit-exact with ``quant.reference.dequantize`` in fp32; the Triton
kernels compute the same expression.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Sequence

import torch

from mxserve_kernels.formats import NESTED_BASE_BITS, WeightScheme, tensor_names

# einfo columns (offsets QOFF..WOFF in OFF_UNIT units; PMOFF, PWSTEP, PMSTEP in elements)
F_KIND, F_BITS, F_GROUP, F_QOFF, F_POFF, F_MOFF, F_WOFF, F_NPLANES, F_PMOFF, F_PWSTEP, F_PMSTEP = range(11)
NFIELDS = 11
# kinds
KIND_NONE, KIND_BF16, KIND_INT, KIND_INT3, KIND_NESTED = range(5)

_SCALE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


ALL_KINDS = 255
# einfo offsets are in units of OFF_UNIT elements: every expert's data starts 16-element aligned, and the kernel
# computes ``off * 16`` so the compiler can prove the alignment and vectorise the tile loads
OFF_UNIT = 16


def kind_bit(kind: int, bits: int, nplanes: int) -> int:
    """Bit of one expert's K-loop specialisation in the kernel's ``KINDS`` mask (bf16 1, int1 2, int2 4, int4 8,
    int8 16, int3 32, nested + 1 plane 64, nested + 2 planes 128; 0 for an expert with no weights)."""
    if kind == KIND_BF16:
        return 1
    if kind == KIND_INT:
        return {1: 2, 2: 4, 4: 8, 8: 16}[bits]
    if kind == KIND_INT3:
        return 32
    if kind == KIND_NESTED:
        return 64 if nplanes == 1 else 128
    return 0


@dataclass
class PackedWeights:
    """One projection ``[N, K]`` of E experts in the runtime layout (module docstring).

    Attributes:
        qw, pw, meta, wbf: flat buffers (never empty: at least one element so kernels get a valid pointer).
        einfo: int64 [E, NFIELDS].
        n, k: out/in features of every expert's weight.
    """

    qw: torch.Tensor
    pw: torch.Tensor
    meta: torch.Tensor
    wbf: torch.Tensor
    einfo: torch.Tensor
    n: int
    k: int
    kinds: int | None = None  # KINDS mask; None: read from einfo at construction (never pass it inside a forward)

    TENSOR_FIELDS = ("qw", "pw", "meta", "wbf", "einfo")

    @property
    def num_experts(self) -> int:
        return int(self.einfo.shape[0])

    def __post_init__(self) -> None:
        # kind mask read from einfo once, at construction (real tensors), never in a forward (no host sync there)
        # with the other host facts the launcher needs: the dominant storage width (``configs.dominant_bits``:
        # which tuned config entry the launches use) and, per plain int width, the gcd of its experts' group sizes
        # (``grouped_gemm.gscale_mask``). None where einfo is not read: explicit ``kinds`` (views built inside
        # forwards, e.g. the offload slot pool) and fake / meta tensors.
        self._dominant_bits = None
        self._int_group_gcd = None
        if self.kinds is not None:
            self._kinds_mask = int(self.kinds)
            return
        try:
            rows = self.einfo.cpu().tolist()
        except Exception:  # fake / meta tensors (tracing): compile every K loop
            self._kinds_mask = ALL_KINDS
            return
        mask, gcd = 0, {}
        for row in rows:
            mask |= kind_bit(row[F_KIND], row[F_BITS], row[F_NPLANES])
            if row[F_KIND] == KIND_INT:
                gcd[row[F_BITS]] = math.gcd(gcd.get(row[F_BITS], 0), int(row[F_GROUP]))
        self._kinds_mask = mask
        self._int_group_gcd = gcd
        from mxserve_kernels._common.configs import dominant_bits  # configs imports this module
        self._dominant_bits = dominant_bits((r[F_KIND], r[F_BITS]) for r in rows)

    @property
    def kinds_mask(self) -> int:
        """``kind_bit`` OR-ed over the experts: the kernel compiles only these K loops."""
        return self._kinds_mask

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors to register as module buffers, keyed ``prefix + field``."""
        return {prefix + f: getattr(self, f) for f in self.TENSOR_FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], *, n: int, k: int, prefix: str = "") -> "PackedWeights":
        """Inverse of ``tensors``; raises ValueError naming a missing tensor."""
        missing = [prefix + f for f in cls.TENSOR_FIELDS if prefix + f not in tensors]
        if missing:
            raise ValueError(f"PackedWeights.from_tensors: missing tensors {missing}")
        return cls(**{f: tensors[prefix + f] for f in cls.TENSOR_FIELDS}, n=n, k=k)

    def to(self, device) -> "PackedWeights":
        return type(self)(**{f: getattr(self, f).to(device) for f in self.TENSOR_FIELDS}, n=self.n, k=self.k)

    def weight_bytes(self, experts: Sequence[int] | None = None) -> int:
        """Bytes the GEMM reads for the given experts' weights (all if None): codes + planes + metadata."""
        info = self.einfo.cpu()
        ids = range(self.num_experts) if experts is None else experts
        total = 0
        for e in ids:
            kind, bits, g, npl = (int(info[e, f]) for f in (F_KIND, F_BITS, F_GROUP, F_NPLANES))
            if kind == KIND_BF16:
                total += 2 * self.n * self.k
            elif kind != KIND_NONE:
                qbits = 2 if kind in (KIND_INT3, KIND_NESTED) else bits
                total += self.n * self.k * (qbits + npl) // 8
                nmeta = 2 + (npl if kind == KIND_NESTED else 0)
                total += nmeta * self.n * (self.k // g) * self.meta.element_size()
        return total


def _check(scheme: WeightScheme, tensors: dict[str, torch.Tensor], n: int, k: int, where: str) -> None:
    scheme.check_shape(n, k, where)
    for name in tensor_names(scheme):
        if name.startswith("plane") and int(name[5]) > scheme.bits:
            continue
        if name not in tensors:
            raise ValueError(f"{where}: missing tensor {name!r} for scheme {scheme.name}")
    if scheme.bits == 16:
        if tuple(tensors["weight"].shape) != (n, k):
            raise ValueError(f"{where}.weight: expected shape {[n, k]}, got {list(tensors['weight'].shape)}")
        return
    qb = NESTED_BASE_BITS if scheme.nested else scheme.bits
    exp = {"qweight": (n, k * qb // 8), "scales": (n, k // scheme.group_size)}
    if not scheme.symmetric:
        exp["zeros"] = exp["scales"]
    for p in range(NESTED_BASE_BITS + 1, scheme.bits + 1) if scheme.nested else ():
        exp[f"plane{p}_weight"] = (n, k // 8)
        exp[f"plane{p}_scales"] = exp["scales"]
    for name, shape in exp.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}.{name}: expected shape {list(shape)}, got {list(t.shape)}")
        if name.endswith("weight") and t.dtype != torch.uint8:
            raise ValueError(f"{where}.{name}: expected uint8, got {t.dtype}")


def _pad16(flat: torch.Tensor) -> torch.Tensor:
    """Zero-pad a flat buffer to a multiple of OFF_UNIT elements (so every expert starts aligned)."""
    pad = -flat.numel() % OFF_UNIT
    return torch.cat([flat, flat.new_zeros(pad)]) if pad else flat


def _words_kmajor(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C] (C % 4 == 0) -> int32 [C/4, N] (little-endian words, K-major)."""
    return packed.contiguous().view(torch.int32).t().contiguous()


def _split_int3(qweight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from mxserve_kernels.quant.reference import pack_codes, unpack_codes
    q = unpack_codes(qweight, 3, k)
    return pack_codes(q & 3, 2), pack_codes(q >> 2, 1)


def pack_projection(experts: Sequence[tuple[WeightScheme, dict[str, torch.Tensor]]], *, n: int, k: int,
                    device=None, where: str = "weight") -> PackedWeights:
    """Convert E experts' canonical tensors of one ``[N, K]`` projection to the runtime layout.

    Args:
        experts: per expert ``(scheme, tensors)``; tensors named by ``formats.tensor_names(scheme)``; nested schemes
            use planes up to ``scheme.bits`` only.
        n, k: weight shape (out, in features).
        device: target device (default: the device of the first tensor).
        where: name used in error messages.
    Returns:
        PackedWeights on ``device``.
    """
    if len(experts) == 0:
        raise ValueError(f"{where}: no experts given")
    if device is None:
        device = next(iter(experts[0][1].values())).device
    sdts = {s.scale_dtype for s, _ in experts if s.bits != 16}
    meta_dtype = _SCALE_DTYPES[sdts.pop()] if len(sdts) == 1 else torch.float32
    qws, pws, metas, wbfs, info = [], [], [], [], []
    qoff = poff = moff = woff = 0
    for e, (s, t) in enumerate(experts):
        w = f"{where}[expert {e}]"
        _check(s, t, n, k, w)
        t = {name: v.to(device) for name, v in t.items()}
        if s.bits == 16:
            wb = _pad16(t["weight"].to(torch.bfloat16).t().contiguous().reshape(-1))
            info.append([KIND_BF16, 16, 0, 0, 0, 0, woff // OFF_UNIT, 0, 0, 0, 0])
            wbfs.append(wb)
            woff += wb.numel()
            continue
        g = s.group_size
        planes: list[torch.Tensor] = []
        pscales: list[torch.Tensor] = []
        if s.nested:
            kind, qb, q = KIND_NESTED, NESTED_BASE_BITS, t["qweight"]
            for p in range(NESTED_BASE_BITS + 1, s.bits + 1):
                planes.append(t[f"plane{p}_weight"])
                pscales.append(t[f"plane{p}_scales"])
            if not planes:
                kind = KIND_INT
        elif s.bits == 3:
            kind, qb = KIND_INT3, 2
            q, hi = _split_int3(t["qweight"], k)
            planes.append(hi)
        else:
            kind, qb, q = KIND_INT, s.bits, t["qweight"]
        scales = t["scales"].to(torch.float32)
        if s.symmetric:
            zeros = scales * -float(1 << (s.bits - 1))
        else:
            zeros = t["zeros"].to(torch.float32)
        meta = torch.stack([scales, zeros] + [p.to(torch.float32) for p in pscales])  # [2+P', N, K/G]
        meta = meta.transpose(1, 2).contiguous().to(meta_dtype).reshape(-1)
        qwk = _words_kmajor(q).reshape(-1)
        meta = _pad16(meta)
        qwk = _pad16(qwk)
        kgn = (k // g) * n
        info.append([kind, s.bits, g, qoff // OFF_UNIT, poff // OFF_UNIT, moff // OFF_UNIT, 0, len(planes),
                     moff + 2 * kgn, (k // 32) * n, kgn])
        qws.append(qwk)
        metas.append(meta)
        qoff += qwk.numel()
        moff += meta.numel()
        if planes:  # an expert's planes are contiguous ([P, K/32, N]), padded once after the last
            pk = _pad16(torch.cat([_words_kmajor(p).reshape(-1) for p in planes]))
            pws.append(pk)
            poff += pk.numel()

    def cat(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros(1, dtype=dtype, device=device)

    return PackedWeights(qw=cat(qws, torch.int32), pw=cat(pws, torch.int32), meta=cat(metas, meta_dtype),
                         wbf=cat(wbfs, torch.bfloat16), einfo=torch.tensor(info, dtype=torch.int64, device=device),
                         n=n, k=k)


def _unpack_kmajor(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K*B/32, N] -> int64 codes [N, K]."""
    per = 32 // bits
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    codes = (words.to(torch.int64).unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [K/per, per, N]
    return codes.reshape(-1, words.shape[1]).t()


def dequant_expert(pw: PackedWeights, e: int) -> torch.Tensor:
    """Dequantize expert ``e`` of a projection from the runtime layout to fp32 ``[N, K]`` (bit-exact with
    ``quant.reference.dequantize`` of the canonical tensors). Returns zeros for an expert with no weights."""
    n, k = pw.n, pw.k
    kind, bits, g, qoff, poff, moff, woff, npl, pmoff, pwstep, pmstep = (int(v) for v in pw.einfo[e].cpu())
    qoff, poff, moff, woff = (v * OFF_UNIT for v in (qoff, poff, moff, woff))
    if kind == KIND_NONE:
        return torch.zeros(n, k, dtype=torch.float32, device=pw.qw.device)
    if kind == KIND_BF16:
        return pw.wbf[woff:woff + n * k].view(k, n).t().to(torch.float32)
    qb = 2 if kind in (KIND_INT3, KIND_NESTED) else bits
    nw = k * qb // 32
    q = _unpack_kmajor(pw.qw[qoff:qoff + nw * n].view(nw, n), qb)
    pn = (k // 32) * n
    planes = [_unpack_kmajor(pw.pw[poff + i * pwstep: poff + i * pwstep + pn].view(k // 32, n), 1)
              for i in range(npl)]
    if kind == KIND_INT3:
        q = q | (planes[0] << 2)
    kgn = (k // g) * n

    def meta_rows(off: int, rows: int) -> torch.Tensor:  # [rows, K/G, N] -> fp32 [rows, N, K]
        m = pw.meta[off:off + rows * kgn].view(rows, k // g, n).to(torch.float32)
        return m.transpose(1, 2).repeat_interleave(g, dim=2)

    meta = meta_rows(moff, 2)
    w = q.to(torch.float32) * meta[0] + meta[1]
    if kind == KIND_NESTED:
        for i in range(npl):
            w = w + (planes[i].to(torch.float32) * 2.0 - 1.0) * meta_rows(pmoff + i * pmstep, 1)[0]
    return w
