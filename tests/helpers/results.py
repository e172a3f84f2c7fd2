"""GPU tests record the numbers they measure into the JSON file named by MXSERVE_TEST_JSON (no-op when unset)."""
from __future__ import annotations

import json
import os

from mxserve import envs


def record_result(key: str, value) -> None:
    """Set ``key`` to ``value`` in the results JSON, rewriting it atomically."""
    path = envs.test_json()
    if not path:
        return
    d = json.load(open(path)) if os.path.exists(path) else {}
    d[key] = value
    with open(path + ".tmp", "w") as f:
        json.dump(d, f, indent=1)
    os.replace(path + ".tmp", path)
