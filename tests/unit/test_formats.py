"""Canonical format contract: bit-exact pack/unpack, names, bit accounting, config round trip."""
import pytest
import torch

from mxserve.config import MxMoEConfig, QuantConfigError
from mxserve_kernels.formats import ALL_BITS, WeightScheme, tensor_names
from mxserve_kernels.quant.reference import pack_codes, unpack_codes


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n,k", [(1, 8), (3, 32), (5, 136), (16, 256)])  # single row, one group, odd K/8, real
def test_pack_unpack_bit_exact(bits, n, k):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, k), codes)


def test_pack_layout_documented_order():
    # 2-bit codes 1,2,3,0 -> byte 0b00_11_10_01 (lowest code in lowest bits)
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3-bit: 8 codes fill 3 bytes as one little-endian stream
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]])
    assert pack_codes(codes, 3).tolist() == [[7, 0, 5 << 5]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[4, 0, 0, 0]]), 2)


@pytest.mark.parametrize("name,bits", [("int2_g128_asym", 2.25), ("int4_g128_sym", 4.125), ("int3_g64_asym", 3.5),
                                       ("int8_g32_asym", 9.0), ("bf16", 16.0), ("int1_g128_asym", 1.25), ("int2_g128_asym_nested4", 4.5)])
def test_scheme_names_and_bits(name, bits):
    s = WeightScheme.parse(name)
    assert s.name == name
    assert s.bits_per_weight == pytest.approx(bits)


def test_scheme_validation_names_field():
    with pytest.raises(ValueError, match="group_size"):
        WeightScheme(bits=4, group_size=100)
    with pytest.raises(ValueError, match="group size 128 does not divide"):
        WeightScheme(bits=4).check_shape(64, 96, "layers.0.q_proj")
    assert tensor_names(WeightScheme(bits=4, symmetric=True)) == ("qweight", "scales")
    assert set(ALL_BITS) == {1, 2, 3, 4, 8, 16}
    with pytest.raises(ValueError, match="asymmetric only"):
        WeightScheme(bits=1, symmetric=True)


def test_config_round_trip_and_errors():
    d = {"quant_method": "mxmoe", "version": 1, "default_scheme": "bf16",
         "modules": {"model.layers.0.self_attn.q_proj": "int8_g128_asym"},
         "experts": {"model.layers.0.mlp.experts": {"gate_up": ["int4_g128_asym", "int2_g128_asym"],
                                                     "down": ["int3_g128_asym", "bf16"]}},
         "kv": None, "offload": None, "meta": {"avg_bits": 3.1}}
    cfg = MxMoEConfig.from_dict(d)
    assert cfg.to_dict() == d
    assert cfg.experts["model.layers.0.mlp.experts"].down[1].bits == 16
    with pytest.raises(QuantConfigError, match=r"experts\['model.layers.0.mlp.experts'\].down\[0\]"):
        MxMoEConfig.from_dict({**d, "experts": {"model.layers.0.mlp.experts": {"gate_up": ["bf16"], "down": ["int5"]}}})
    with pytest.raises(QuantConfigError, match="unknown field"):
        MxMoEConfig.from_dict({**d, "kv_cache_scheme": 1})


def test_int1_dequantize_round_trip():
    from mxserve_kernels.quant.reference import dequantize
    s = WeightScheme.parse("int1_g128_asym")
    codes = torch.randint(0, 2, (4, 256), dtype=torch.uint8)
    scales = torch.rand(4, 2, dtype=torch.bfloat16)
    zeros = torch.randn(4, 2, dtype=torch.bfloat16)
    w = dequantize(s, {"qweight": pack_codes(codes, 1), "scales": scales, "zeros": zeros}, 256)
    ref = codes.float() * scales.float().repeat_interleave(128, 1) + zeros.float().repeat_interleave(128, 1)
    assert torch.equal(w, ref)
