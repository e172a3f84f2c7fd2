"""Atomic JSON writes: complete file or nothing, directory created, no temp file left behind on failure."""
import json

import pytest

from mxserve.io import write_json_atomic


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serialisable: the old content stays
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
