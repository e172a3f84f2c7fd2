"""Local training text that every machine has: the Python standard library's own sources (deterministic order)."""
from __future__ import annotations

import pathlib
import sysconfig


def stdlib_files() -> list[pathlib.Path]:
    """Sorted ``*.py`` files of the running interpreter's standard library (no site-packages, no tests)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and "dist-packages" not in p.parts and "test" not in p.parts
             and "tests" not in p.parts and "idlelib" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_corpus(max_bytes: int | None = None, heldout_every: int = 20) -> tuple[str, str]:
    """(train_text, heldout_text): every ``heldout_every``-th file goes to held-out; stops after ``max_bytes``."""
    train, held, total = [], [], 0
    for i, p in enumerate(stdlib_files()):
        try:
            txt = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if i % heldout_every == heldout_every - 1 else train).append(txt)
        total += len(txt)
        if max_bytes is not None and total >= max_bytes and held:
            break
    if not train or not held:
        raise FileNotFoundError("no Python standard-library sources found to build the local corpus")
    return "\n".join(train), "\n".join(held)
