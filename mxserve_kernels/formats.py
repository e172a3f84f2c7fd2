"""Canonical (checkpoint) weight formats: the bit-layout contract shared by quantizers, packers and kernels.

A linear weight ``W`` has shape ``[N, K]`` (out_features, in_features), as in ``nn.Linear``. Quantization
groups run along K: group ``g`` of row ``n`` covers ``W[n, g*G:(g+1)*G]``.

Integer schemes (``bits`` in 1, 2, 3, 4, 8; 1-bit is asymmetric only: ``W ~= q * scale + zero``, q in {0, 1}):
  * codes ``q`` are unsigned, ``0 <= q < 2**bits``;
  * asymmetric: ``W ~= q * scale + zero`` where ``zero`` is a float (the group minimum, MxMoE/KIVI style);
  * symmetric:  ``W ~= (q - 2**(bits-1)) * scale`` with ``q - 2**(bits-1)`` in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``
    (the most negative code is never produced; int4 sym uses +-7);
  * tensors: ``qweight`` uint8 ``[N, K*bits/8]``; ``scales`` ``[N, K/G]`` (bf16 or fp16); ``zeros`` ``[N, K/G]``
    same dtype (asymmetric only).

Packing (``pack_codes``): each row is a little-endian bit stream along K. Code ``k`` of a row occupies stream bits
``[k*bits, (k+1)*bits)``; stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``. For 2/4/8 bits this means byte ``j``
holds codes ``j*8/bits ...`` lowest code in the lowest bits; for 3 bits, 8 codes fill 3 bytes. K must be a multiple
of 8 (always true since G in {32, 64, 128} divides K).

Nested "matryoshka" weights (D2MoE MWQ), ``nested=True``: an asymmetric int2 base (as above) plus binary residual
planes for bit prefixes 3 and 4. Plane ``p`` has ``sign`` (1 bit per weight, packed like a 1-bit code, 1 => +1,
0 => -1) and ``scale`` ``[N, K/G]``. Prefix ``b`` dequantizes as ``base + sum_{p=3..b} scale_p * sign_p``.
Checkpoint names: ``qweight, scales, zeros`` (base), ``plane3_weight, plane3_scales, plane4_weight, plane4_scales``.

``bits == 16`` is bf16 passthrough (tensor name ``weight``).

Reported bits always include metadata: ``bits + 16*(1 + asym)/G`` for 16-bit scale/zero (int2 g128 asym = 2.25).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

INT_BITS = (1, 2, 3, 4, 8)
ALL_BITS = (1, 2, 3, 4, 8, 16)
GROUP_SIZES = (32, 64, 128)
SCALE_DTYPES = ("bf16", "fp16")
NESTED_BASE_BITS = 2
NESTED_MAX_BITS = 4
FORMAT_VERSION = 1

_NAME_RE = re.compile(r"^int(?P<bits>[12348])_g(?P<g>\d+)_(?P<sym>sym|asym)(?P<sd>_fp16)?(?P<nested>_nested(?P<prefix>[234])?)?$")


@dataclass(frozen=True)
class WeightScheme:
    """One weight quantization scheme (canonical format), e.g. ``int4_g128_asym``.

    Args:
        bits: 1, 2, 3, 4, 8, or 16 (bf16 passthrough); 1-bit (MxMoE's w1, 1.25 bits at g128) is asymmetric.
        group_size: G, quantization group length along K (32, 64 or 128); ignored for 16 bits.
        symmetric: symmetric codes (no zeros tensor) if True.
        scale_dtype: "bf16" or "fp16" for scales and zeros.
        nested: MWQ int2 base + residual planes; ``bits`` is then the prefix used at runtime (2..4).
    """

    bits: int
    group_size: int = 128
    symmetric: bool = False
    scale_dtype: str = "bf16"
    nested: bool = False

    def __post_init__(self) -> None:
        if self.bits not in ALL_BITS:
            raise ValueError(f"WeightScheme.bits must be one of {ALL_BITS}, got {self.bits}")
        if self.bits == 16:
            if self.nested:
                raise ValueError("WeightScheme: bf16 passthrough cannot be nested")
            return
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"WeightScheme.group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"WeightScheme.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.bits == 1 and self.symmetric:
            raise ValueError("WeightScheme: 1-bit weights are asymmetric only (q * scale + zero)")
        if self.nested and (self.symmetric or not NESTED_BASE_BITS <= self.bits <= NESTED_MAX_BITS):
            raise ValueError("WeightScheme: nested weights are asymmetric with a runtime prefix of 2..4 bits")

    # ---- naming -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.bits == 16:
            return "bf16"
        base = NESTED_BASE_BITS if self.nested else self.bits
        s = f"int{base}_g{self.group_size}_{'sym' if self.symmetric else 'asym'}"
        if self.scale_dtype == "fp16":
            s += "_fp16"
        if self.nested:
            s += f"_nested{self.bits}"
        return s

    @classmethod
    def parse(cls, name: str) -> "WeightScheme":
        """Inverse of ``name`` (``"bf16"``, ``"int4_g128_asym"``, ``"int2_g64_asym_nested4"``...)."""
        if name in ("bf16", "w16", "16"):
            return cls(bits=16)
        m = _NAME_RE.match(name)
        if not m:
            raise ValueError(f"unknown weight scheme name {name!r} (expected e.g. 'int4_g128_asym' or 'bf16')")
        nested = m.group("nested") is not None
        if nested and int(m.group("bits")) != NESTED_BASE_BITS:
            raise ValueError(f"nested scheme {name!r} must have an int{NESTED_BASE_BITS} base")
        bits = int(m.group("prefix") or NESTED_MAX_BITS) if nested else int(m.group("bits"))
        return cls(bits=bits, group_size=int(m.group("g")), symmetric=m.group("sym") == "sym",
                   scale_dtype="fp16" if m.group("sd") else "bf16", nested=nested)

    # ---- sizes --------------------------------------------------------------------------------------------
    @property
    def meta_bits_per_weight(self) -> float:
        """Scale (+zero) bits amortised per weight; nested adds one scale per active plane."""
        if self.bits == 16:
            return 0.0
        per_group = 16 * (1 if self.symmetric else 2)
        if self.nested:
            per_group += 16 * (self.bits - NESTED_BASE_BITS)
        return per_group / self.group_size

    @property
    def bits_per_weight(self) -> float:
        """True storage bits per weight including metadata (int2 g128 asym -> 2.25)."""
        return float(self.bits) + self.meta_bits_per_weight

    def check_shape(self, n: int, k: int, where: str = "weight") -> None:
        """Raise ValueError naming ``where`` if ``[n, k]`` cannot use this scheme."""
        if self.bits == 16:
            return
        if k % self.group_size:
            raise ValueError(f"{where}: group size {self.group_size} does not divide in_features K={k}")
        if k % 8:
            raise ValueError(f"{where}: in_features K={k} must be a multiple of 8 for bit packing")

    def packed_cols(self, k: int) -> int:
        """Bytes per row of ``qweight`` for K input features."""
        return k * (NESTED_BASE_BITS if self.nested else self.bits) // 8

    def num_groups(self, k: int) -> int:
        return k // self.group_size

    def storage_bytes(self, n: int, k: int) -> int:
        """Exact bytes of all tensors of one [n, k] weight in this scheme."""
        return math.ceil(n * k * self.bits_per_weight / 8)


BF16 = WeightScheme(bits=16)


def tensor_names(scheme: WeightScheme) -> tuple[str, ...]:
    """Checkpoint tensor suffixes a module quantized with ``scheme`` must have (``<module>.<suffix>``)."""
    if scheme.bits == 16:
        return ("weight",)
    names = ["qweight", "scales"] + ([] if scheme.symmetric else ["zeros"])
    if scheme.nested:
        for p in range(NESTED_BASE_BITS + 1, NESTED_MAX_BITS + 1):
            names += [f"plane{p}_weight", f"plane{p}_scales"]
    return tuple(names)
