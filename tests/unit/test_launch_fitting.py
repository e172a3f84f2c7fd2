"""The shared-memory fallback of the grouped GEMM launcher (``_common/fit.launch_fitting`` + ``smaller_configs``).

Session 6 (H200): a W4-tuned SWAP config (BLOCK_N 128, 3 stages) needed 266,752 B of shared memory on nested offload
slot views (limit 232,448) and Triton raised OutOfResources. Triton raises it before launching, so the launcher
retries smaller configs; here the device is modelled by a launch that raises above a shared-memory budget.
"""
import pytest

from mxserve_kernels._common import fit
from mxserve_kernels.moe.grouped_gemm import smaller_configs

# BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, FMA, SPLIT_K, KT, ASM, SWAP, GSCALE
SWAP_CFG = [16, 128, 16, 8, 3, 0, 1, 0, 1, 1, 8]


def _smem(c):  # a monotone stand-in for the kernel's shared memory: stages x tile, SWAP tiles 4x larger
    return c[4] * c[1] * c[2] * (4 if c[9] else 1)


def _device(limit):
    ran = []

    def launch(c):
        if _smem(c) > limit:
            raise fit.OutOfResources(_smem(c), limit, "shared memory")
        ran.append(list(c))
    return launch, ran


@pytest.fixture(autouse=True)
def _fresh():
    fit._FITTED.clear()
    yield
    fit._FITTED.clear()


def test_fits_first_try_runs_cfg_unchanged():
    launch, ran = _device(10 ** 9)
    assert fit.launch_fitting(launch, SWAP_CFG, "k", smaller_configs) == SWAP_CFG
    assert ran == [SWAP_CFG] and not fit._FITTED


def test_first_fitting_fallback_is_used_and_remembered():
    limit = 2 * 128 * 16 * 4  # SWAP at 2 stages fits, 3 does not
    launch, ran = _device(limit)
    got = fit.launch_fitting(launch, SWAP_CFG, "k", smaller_configs)
    assert got == SWAP_CFG[:4] + [2] + SWAP_CFG[5:]
    assert ran == [got]
    # second call: straight to the remembered config (one launch, the failing one is not retried)
    ran.clear()
    assert fit.launch_fitting(launch, SWAP_CFG, "k", smaller_configs) == got and ran == [got]
    # another call site key is not affected
    assert ("other", tuple(SWAP_CFG)) not in fit._FITTED


def test_swap_dropped_before_block_n_shrinks():
    limit = 3 * 128 * 16  # no SWAP config fits at any stage count; plain BLOCK_N 128 at 3 stages does
    launch, _ = _device(limit)
    got = fit.launch_fitting(launch, SWAP_CFG, "k", smaller_configs)
    assert got == SWAP_CFG[:9] + [0, 0]           # SWAP and GSCALE off, original tile and stages


def test_order_and_invariants_of_smaller_configs():
    cands = smaller_configs(SWAP_CFG)
    assert len({tuple(c) for c in cands}) == len(cands) and SWAP_CFG not in cands
    for c in cands:
        assert c[0] == SWAP_CFG[0] and c[2] == SWAP_CFG[2] and c[3] == SWAP_CFG[3] and c[6] == SWAP_CFG[6]
        assert c[1] >= 16 and c[4] >= 1
        if c[1] < SWAP_CFG[1]:
            assert c[9] == 0 and c[10] == 0        # SWAP needs BLOCK_N >= 64 per 4 warps: never with a smaller tile
    # monotone in the modelled shared memory within each phase: the first candidate is the mildest change
    assert cands[0] == SWAP_CFG[:4] + [2] + SWAP_CFG[5:]
    plain = [16, 64, 32, 4, 3, 0, 1, 0, 1, 0, 0]
    assert all(c[9] == 0 for c in smaller_configs(plain)) and smaller_configs(plain)[0][4] == 2


def test_nothing_fits_raises_naming_the_config():
    launch, ran = _device(0)
    with pytest.raises(RuntimeError, match=r"config \[16, 128, 16, 8, 3"):
        fit.launch_fitting(launch, SWAP_CFG, "k", smaller_configs)
    assert not ran and not fit._FITTED
