"""Small file helpers shared across mxserve (no vllm): atomic writes so nothing is ever half-written."""
from __future__ import annotations

import json
import os
import tempfile


def write_json_atomic(path, obj, *, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file in the same directory and a rename (creates the dir)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
