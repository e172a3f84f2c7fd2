"""`mxserve quantize` source selection errors (SRC vs --synthetic-source): one clear line, nothing written."""
from __future__ import annotations

import pytest

from mxserve.cli.main import main


@pytest.mark.parametrize("args,msg", [
    (["--synthetic-source", "nope"], "unknown preset"),
    (["somedir", "--synthetic-source", "qwen3-30b-a3b"], "either SRC or --synthetic-source"),
    ([], "SRC .* or --synthetic-source PRESET is required"),
    (["somedir", "--layers", "4"], "--layers only applies"),
])
def test_source_errors(tmp_path, capsys, args, msg):
    out = tmp_path / "q"
    assert main(["quantize", *args, "--out", str(out), "--bits", "2.25"]) == 2
    import re
    assert re.search(msg, capsys.readouterr().err)
    assert not out.exists()
