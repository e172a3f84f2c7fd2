"""Weight-coverage checks for mxmoe checkpoints (vLLM does not track missing tensors for quantized models).

Two layers of defence, both raising one error that names the offending tensor(s):
  * ``check_checkpoint`` (process0, before loading): the checkpoint's safetensors headers vs the plan: every tensor
    the plan names must exist, and no quantized-layout tensor may sit under a module the plan does not quantize that
    way (``UnexpectedTensorError``/``MissingTensorError``);
  * ``check_loaded`` (each worker, in ``process_weights_after_loading``): every parameter shard the layer allocated was
    written by a weight loader (catches loader-mapping bugs, partial checkpoints, EP/TP slicing mistakes).

``--load-format dummy`` (benchmarks with random weights) skips the second check and fills valid random codes
(``fill_dummy_``) so kernels see finite scales.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Iterable

import torch

from mxserve.config import MxMoEConfig
from mxserve_kernels.formats import WeightScheme, tensor_names

QUANT_SUFFIX_RE = re.compile(r"\.(qweight|scales|zeros|plane\d_weight|plane\d_scales)$")
_SHOW = 8


class MissingTensorError(ValueError):
    """A tensor named by the mxmoe plan was not found / not loaded."""


class UnexpectedTensorError(ValueError):
    """A checkpoint tensor that the mxmoe plan does not account for."""


def _names(items: Iterable[str]) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def safetensors_names(model_dir: str) -> set[str]:
    """All tensor names in ``model_dir/*.safetensors`` (reads only the JSON headers)."""
    names: set[str] = set()
    for fn in sorted(os.listdir(model_dir)):
        if not fn.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, fn)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (short header)")
            (n,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(n))
        names.update(k for k in header if k != "__metadata__")
    return names


def expert_ckpt_names(hf_config: Any) -> tuple[str, str, str]:
    """Checkpoint (gate, up, down) projection names of the MoE experts for an HF config (default Qwen naming)."""
    from mxserve.models.arch import arch_for_config
    try:
        a = arch_for_config(hf_config)
    except ValueError:
        return ("gate_proj", "up_proj", "down_proj")
    return (a.gate, a.up, a.down)


def expected_tensors(cfg: MxMoEConfig, hf_config: Any = None) -> dict[str, WeightScheme]:
    """Every checkpoint tensor the plan names (HF names) -> the scheme that requires it."""
    gate, up, down = expert_ckpt_names(hf_config) if hf_config is not None else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, WeightScheme] = {}
    for mod, s in cfg.modules.items():
        for suf in tensor_names(s):
            out[f"{mod}.{suf}"] = s
    for key, plan in cfg.experts.items():
        for e in range(plan.num_experts):
            for proj, s in ((gate, plan.gate_up[e]), (up, plan.gate_up[e]), (down, plan.down[e])):
                for suf in tensor_names(s):
                    out[f"{key}.{e}.{proj}.{suf}"] = s
    return out


def check_checkpoint(cfg: MxMoEConfig, model_dir: str, hf_config: Any = None) -> None:
    """Raise Missing/UnexpectedTensorError if ``model_dir``'s tensors do not match the plan exactly.

    Rules: all plan tensors present; under a planned module or expert no other tensor (except ``.bias``); a
    quantized-layout tensor (qweight/scales/zeros/plane*) elsewhere must belong to a module quantized by the
    plan's ``default_scheme``.
    """
    present = safetensors_names(model_dir)
    if not present:
        return  # e.g. --load-format dummy on a config-only directory
    expected = expected_tensors(cfg, hf_config)
    missing = set(expected) - present
    if missing:
        raise MissingTensorError(
            f"mxmoe: checkpoint {model_dir} lacks {len(missing)} tensor(s) named by its quantization_config: "
            f"{_names(missing)}")
    planned_modules = {n.rsplit(".", 1)[0] for n in expected}
    default_suffixes = set(tensor_names(cfg.default_scheme))
    unexpected = []
    for name in present - set(expected):
        module = name.rsplit(".", 1)[0]
        if name.endswith(".bias"):
            continue
        if module in planned_modules or any(name.startswith(k + ".") for k in cfg.experts):
            unexpected.append(name)
        elif QUANT_SUFFIX_RE.search(name) and (cfg.default_scheme.bits == 16
                                               or name.rsplit(".", 1)[1] not in default_suffixes):
            unexpected.append(name)
    if unexpected:
        raise UnexpectedTensorError(
            f"mxmoe: checkpoint {model_dir} has {len(unexpected)} tensor(s) its quantization_config does not "
            f"account for: {_names(unexpected)}")


def check_loaded(where: str, expected: dict[Any, str], loaded: set) -> None:
    """Raise MissingTensorError naming every expected key (mapped to its checkpoint name) not in ``loaded``."""
    missing = [name for key, name in expected.items() if key not in loaded]
    if missing:
        raise MissingTensorError(f"mxmoe: {where}: {len(missing)} tensor(s) were never loaded: {_names(missing)}")


def is_dummy_load() -> bool:
    """True while vLLM loads with ``--load-format dummy`` (random weights)."""
    try:
        from vllm.config import get_current_vllm_config
        return str(get_current_vllm_config().load_config.load_format) == "dummy"
    except Exception:
        return False


@torch.no_grad()
def fill_dummy_(scheme: WeightScheme, tensors: dict[str, torch.Tensor]) -> None:
    """Fill canonical tensors in place (on their device) with random codes and small finite scales."""
    for name, t in tensors.items():
        if t.dtype == torch.uint8:
            t.random_(0, 256)
        elif name == "weight":
            t.normal_(0.0, 0.02)
        elif name == "zeros":
            t.fill_(-0.02)
        else:
            t.fill_(0.02 / max(1, (1 << (2 if scheme.nested else scheme.bits)) - 1))
