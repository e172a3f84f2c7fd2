"""Suite-wide fixtures: seeds, tier markers by folder, clean GPU skips, the vLLM CPU-platform recipe."""
from __future__ import annotations

import os
import pathlib
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TIER_BY_DIR = {"unit": "unit", "contract": "contract", "kernels": "gpu", "integration": "gpu"}


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    has_cuda = _has_cuda()
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run `pytest -m gpu` on the H200 with the gpu-kit)")
    for item in items:
        parts = pathlib.Path(str(item.fspath)).parts
        tier_marks = {"unit", "contract", "gpu"} & {m.name for m in item.iter_markers()}
        if not tier_marks:
            for d, mark in _TIER_BY_DIR.items():
                if d in parts:
                    item.add_marker(getattr(pytest.mark, mark))
                    break
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch
    torch.manual_seed(0)
    yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_cpu():
    """vLLM on its CPU platform with a 1-rank gloo process group (../shared/docs/vllm-0.26.md §11).

    Yields the VllmConfig to use under ``set_current_vllm_config``. Must run before any other vLLM import that
    resolves the platform; contract tests request it first.
    """
    import vllm.platforms as P
    from vllm.platforms.cpu import CpuPlatform
    P._current_platform = CpuPlatform()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    cfg = VllmConfig(device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(cfg):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        initialize_model_parallel(1)
        yield cfg


@pytest.fixture(autouse=True)
def _fresh_forward_context(request):
    """Tests that build vLLM layers on the shared CPU config register layer names in its static forward context;
    drop what a test added so the next test may reuse ``model.layers.N...`` names (vLLM rejects duplicates)."""
    if "vllm_cpu" not in request.fixturenames:
        yield
        return
    from vllm.config import get_current_vllm_config
    ctx = get_current_vllm_config().compilation_config.static_forward_context
    before = set(ctx)
    yield
    for name in set(ctx) - before:
        del ctx[name]
