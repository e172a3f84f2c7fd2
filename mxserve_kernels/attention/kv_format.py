"""Bit layout of one quantized KV page slot (THE contract between store, decode, prefill and their references).

A paged KV cache layer is one uint8 tensor ``[num_pages, P, H_kv, slot_bytes]``: every (token, kv head) owns one
slot holding both its key and its value, quantized **per token** in groups of ``group`` consecutive channels
(after the layer's within-head channel permutation, see ``mxserve.kvcache``). Because no group spans two tokens,
no group spans two requests, a slot is a pure function of its token (prefix caching stays correct) and a token is
quantized once, when it is written (never re-quantized).

Slot layout (byte offsets, in this order, no padding between regions except to ``slot_align``)::

    [ K codes | V codes | K meta | V meta | pad ]

* codes of ``bits`` in {2, 4, 8}: little-endian within a byte, channel ``d`` at bits ``(d % (8/bits))*bits`` of
  byte ``d // (8/bits)``; ``D*bits/8`` bytes.
* ternary ("1.5-bit", stored honestly at 1.6 bit): 5 trits per byte, ``byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4``
  for channels ``5j..5j+4`` of a group; each group starts on a byte (``ceil(group/5)`` bytes per group).
* meta: per group ``(scale, zero)`` as two little-endian fp16 (4 bytes per group); dequant ``x = q*scale + zero``.

Quantization (asymmetric, clipped, SKVQ-style): ``lo = clip*min(x_g)``, ``hi = clip*max(x_g)``,
``scale = max((hi-lo)/qmax, 1e-8)`` rounded to fp16, ``zero = lo`` rounded to fp16,
``q = clamp(round((x - zero)/scale), 0, qmax)`` with round-half-to-even, computed in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

TERNARY = 1.5  # the "1.5-bit" label; storage is 1.6 bit (5 trits / byte)
SUPPORTED_BITS = (2, 4, 8, TERNARY)
META_BYTES_PER_GROUP = 4  # fp16 scale + fp16 zero


def qmax_of(bits: float) -> int:
    """Largest code of a bit width (ternary: 2)."""
    return 2 if bits == TERNARY else (1 << int(bits)) - 1


def code_bytes(bits: float, d: int, group: int) -> int:
    """Bytes of packed codes for ``d`` channels in groups of ``group``."""
    if bits == TERNARY:
        return (d // group) * ((group + 4) // 5)
    return d * int(bits) // 8


def storage_bits(bits: float) -> float:
    """Physical bits per code (ternary: 8/5)."""
    return 1.6 if bits == TERNARY else float(bits)


@dataclass(frozen=True)
class KVSlotFormat:
    """Layout of one (token, kv-head) slot.

    Args:
        head_dim: D (keys and values share it).
        k_bits, v_bits: 2, 4, 8, or 1.5 (ternary).
        k_group, v_group: channels per quantization group (divides D; ternary groups are multiples of 5 or padded).
        slot_align: slot size is rounded up to a multiple of this many bytes (keeps fp16 meta aligned).
    """

    head_dim: int
    k_bits: float = 2
    v_bits: float = TERNARY
    k_group: int = 64
    v_group: int = 128
    slot_align: int = 2

    def __post_init__(self) -> None:
        for name, b, g in (("k", self.k_bits, self.k_group), ("v", self.v_bits, self.v_group)):
            if b not in SUPPORTED_BITS:
                raise ValueError(f"KVSlotFormat.{name}_bits: {b} not in {SUPPORTED_BITS}")
            if g <= 0 or self.head_dim % g:
                raise ValueError(f"KVSlotFormat.{name}_group: {g} must divide head_dim={self.head_dim}")
            if b != TERNARY and (g * int(b)) % 8:
                raise ValueError(f"KVSlotFormat.{name}_group: {g} channels * {b} bits is not whole bytes")
        if self.head_dim <= 0 or self.slot_align <= 0:
            raise ValueError(f"KVSlotFormat: bad head_dim={self.head_dim} / slot_align={self.slot_align}")

    # ---- offsets -----------------------------------------------------------------------------------------
    @property
    def k_code_bytes(self) -> int:
        return code_bytes(self.k_bits, self.head_dim, self.k_group)

    @property
    def v_code_bytes(self) -> int:
        return code_bytes(self.v_bits, self.head_dim, self.v_group)

    @property
    def k_off(self) -> int:
        return 0

    @property
    def v_off(self) -> int:
        return self.k_code_bytes

    @property
    def k_meta_off(self) -> int:
        # fp16 meta must start on an even byte
        return _round_up(self.v_off + self.v_code_bytes, 2)

    @property
    def v_meta_off(self) -> int:
        return self.k_meta_off + (self.head_dim // self.k_group) * META_BYTES_PER_GROUP

    @property
    def used_bytes(self) -> int:
        return self.v_meta_off + (self.head_dim // self.v_group) * META_BYTES_PER_GROUP

    @property
    def slot_bytes(self) -> int:
        """Bytes per (token, kv head), K and V together, metadata included."""
        return _round_up(self.used_bytes, self.slot_align)

    # ---- accounting --------------------------------------------------------------------------------------
    def bits_per_element(self) -> float:
        """Average stored bits per K or V element, codes + metadata + padding (slot_bytes*8 / 2D)."""
        return self.slot_bytes * 8 / (2 * self.head_dim)

    def compression_vs(self, elem_bytes: int = 2) -> float:
        """Capacity multiplier vs an unquantized cache of ``elem_bytes`` per element (bf16: 2)."""
        return 2 * self.head_dim * elem_bytes / self.slot_bytes

    @property
    def label(self) -> str:
        def b(x: float) -> str:
            return "1.5" if x == TERNARY else str(int(x))
        return f"K{b(self.k_bits)}V{b(self.v_bits)}"


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def parse_kv_label(label: str) -> tuple[float, float]:
    """``"K2V1.5"`` -> (2, 1.5); ``"K4V4"`` -> (4, 4). Raises ValueError naming the label."""
    s = label.strip().upper()
    if not s.startswith("K") or "V" not in s:
        raise ValueError(f"KV config label {label!r}: expected like 'K2V1.5' or 'K4V4'")
    k, v = s[1:].split("V", 1)
    try:
        kb, vb = float(k), float(v)
    except ValueError:
        raise ValueError(f"KV config label {label!r}: bits are not numbers") from None
    kb = int(kb) if kb != TERNARY else kb
    vb = int(vb) if vb != TERNARY else vb
    if kb not in SUPPORTED_BITS or vb not in SUPPORTED_BITS:
        raise ValueError(f"KV config label {label!r}: bits must be in {SUPPORTED_BITS}")
    return kb, vb
