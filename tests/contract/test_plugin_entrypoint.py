"""Foundation acceptance: vLLM discovers mxserve through its `vllm.general_plugins` entry point, in a fresh process,
without initialising CUDA, and registering twice is harmless."""
import subprocess
import sys

CHECK = r"""
import importlib.metadata as md
eps = {e.name: e.value for e in md.entry_points(group="vllm.general_plugins")}
assert eps.get("mxserve") == "mxserve.vllm_plugin:register", eps
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
import mxserve.vllm_plugin as p
p._registered = False
p.register(); p.register()  # idempotent even when forced to run again
import torch
print(QUANTIZATION_METHODS.count("mxmoe"), torch.cuda.is_initialized())
"""


def test_general_plugin_registers_mxmoe_without_cuda():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["1", "False"], out.stdout
