"""Launch a Triton kernel with the first config of a fallback sequence that fits the device (shared memory).

A tuned config can be infeasible for weights it was not tuned on: the offload slot views of nested experts take the
W4 entry, and a SWAP config with BLOCK_N 128 needs 201-267 KB of shared memory there (H200 limit 227 KB; session 6:
``triton.runtime.errors.OutOfResources`` in the 48-layer offload bench). Triton raises OutOfResources when it loads
the compiled binary, before anything is launched, so retrying with a smaller config is safe. The config that fitted
is remembered per call site key: later calls launch it directly (one compile per fallback, during warm-up).
"""
from __future__ import annotations

import logging
from typing import Callable, Hashable, Iterable

_log = logging.getLogger("mxserve_kernels")
_FITTED: dict[Hashable, list[int]] = {}

try:
    from triton.runtime.errors import OutOfResources
except Exception:  # pragma: no cover - environment without triton
    class OutOfResources(Exception):  # type: ignore[no-redef]
        pass


def launch_fitting(launch: Callable[[list[int]], None], cfg: list[int], key: Hashable,
                   fallbacks: Callable[[list[int]], Iterable[list[int]]]) -> list[int]:
    """Run ``launch(cfg)``; when Triton reports the binary does not fit the device, run ``launch`` with the first of
    ``fallbacks(cfg)`` that fits and remember it for ``(key, cfg)``.

    Args:
        launch: launches the kernel for one config list (raises OutOfResources before launching if it does not fit).
        cfg: the requested config list. key: the call site's specialization (mode, kinds, shapes, dtype...).
        fallbacks: ordered smaller configs to try.
    Returns:
        the config list that ran.
    Raises:
        RuntimeError naming the config when neither it nor any fallback fits.
    """
    full = (key, tuple(cfg))
    chosen = _FITTED.get(full)
    if chosen is not None:
        launch(chosen)
        return chosen
    try:
        launch(cfg)
        return cfg
    except OutOfResources as err:
        first = err
    for cand in fallbacks(cfg):
        try:
            launch(cand)
        except OutOfResources:
            continue
        _FITTED[full] = cand
        _log.warning("mxserve_kernels: config %s of %s does not fit the device (%s); using %s", cfg, key, first,
                     cand)
        return cand
    raise RuntimeError(f"mxserve_kernels: config {cfg} of {key} does not fit the device ({first}) and no fallback "
                       f"fits") from first
