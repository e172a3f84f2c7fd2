"""``mxserve_kernels.warmup.token_counts``: the token counts compiled at load, and warm-up is a no-op off the GPU."""
import pytest
import torch

from mxserve_kernels import warmup
from mxserve_kernels._common.synth import random_canonical
from mxserve_kernels.formats import WeightScheme
from mxserve_kernels.quant import prepare_linear


def test_token_counts_cover_powers_of_two_the_max_and_an_odd_count():
    c = warmup.token_counts(300)
    assert c == sorted(set(c))
    assert c[0] == 1 and c[-1] == 300 and 3 in c
    assert [t for t in c if t & (t - 1) == 0] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert warmup.token_counts(1) == [1]
    with pytest.raises(ValueError, match="max_tokens"):
        warmup.token_counts(0)


def test_warmup_is_a_noop_on_cpu_tensors():
    s = WeightScheme.parse("int4_g128_asym")
    lw = prepare_linear(s, random_canonical(s, 32, 128, generator=torch.Generator().manual_seed(0)), k=128)
    assert warmup.warm_linear(lw, 64) == 0
