"""Atomic, sharded writer of an HF checkpoint directory.

Everything is written into a temp dir next to the destination and renamed into place by ``commit``; an error (or
``abort``) removes the temp dir, so the destination is never half-written. Tensors are buffered per *stream* and
flushed to a shard when the buffer passes ``shard_bytes``, so memory stays bounded for large models. Stream
``"main"`` holds base tensors; the nested planes go to streams ``"plane3"``/``"plane4"`` (their own shards) so a
runtime can load the int2 base first and the residual planes on demand.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "added_tokens.json")
SHARD_BYTES = 2 << 30


class AtomicCheckpointWriter:
    """Write ``dst`` atomically.

    Lifecycle: ``w = AtomicCheckpointWriter(dst)`` -> ``w.add(name, tensor, stream)`` ... ->
    ``w.commit(config_dict, copy_from=src)`` (or ``w.abort()``); also usable as a context manager that aborts
    on exceptions.

    Args:
        dst: destination directory; must not exist unless ``force``.
        force: replace an existing ``dst`` (only at commit time).
    """

    def __init__(self, dst: str | pathlib.Path, force: bool = False, shard_bytes: int = SHARD_BYTES):
        self.dst = pathlib.Path(dst)
        if self.dst.exists() and not force:
            raise FileExistsError(f"{self.dst} exists (use --force to replace it)")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=str(self.dst.parent)))
        self.force = force
        self.shard_bytes = shard_bytes
        self._buf: dict[str, dict[str, torch.Tensor]] = {}
        self._buf_bytes: dict[str, int] = {}
        self._shards: list[tuple[str, list[str]]] = []   # (temp file name, tensor names)
        self.total_bytes = 0

    def __enter__(self) -> "AtomicCheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor, stream: str = "main") -> None:
        """Queue one tensor (moved to CPU, made contiguous) for writing."""
        t = tensor.detach().to("cpu").contiguous()
        buf = self._buf.setdefault(stream, {})
        if name in buf or any(name in names for _, names in self._shards):
            raise ValueError(f"checkpoint writer: tensor {name!r} written twice")
        buf[name] = t
        nb = t.numel() * t.element_size()
        self._buf_bytes[stream] = self._buf_bytes.get(stream, 0) + nb
        self.total_bytes += nb
        if self._buf_bytes[stream] >= self.shard_bytes:
            self._flush(stream)

    def _flush(self, stream: str) -> None:
        from safetensors.torch import save_file
        buf = self._buf.pop(stream, {})
        self._buf_bytes[stream] = 0
        if not buf:
            return
        fname = f"part-{len(self._shards):05d}-{stream}.safetensors"
        save_file(buf, str(self.tmp / fname), metadata={"format": "pt"})
        self._shards.append((fname, list(buf)))

    def commit(self, config: dict, copy_from: str | pathlib.Path | None = None,
               extra_files: dict[str, str] | None = None) -> pathlib.Path:
        """Flush, name shards ``model-0000i-of-0000n.safetensors`` (main first, then planes), write the index,
        config.json, copy tokenizer files from ``copy_from``, then rename the temp dir to ``dst``."""
        try:
            for stream in sorted(self._buf, key=lambda s: (s != "main", s)):
                self._flush(stream)
            order = sorted(range(len(self._shards)), key=lambda i: (not self._shards[i][0].endswith("-main.safetensors"), i))
            n = len(order)
            weight_map = {}
            for j, i in enumerate(order):
                old, names = self._shards[i]
                new = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.tmp / old, self.tmp / new)
                weight_map.update({nm: new for nm in names})
            if n != 1:
                (self.tmp / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                    indent=1))
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            if copy_from is not None:
                for f in TOKENIZER_FILES:
                    p = pathlib.Path(copy_from) / f
                    if p.is_file():
                        shutil.copy2(p, self.tmp / f)
            for name, text in (extra_files or {}).items():
                (self.tmp / name).write_text(text)
            if self.dst.exists():
                if not self.force:
                    raise FileExistsError(f"{self.dst} appeared while writing (use --force to replace it)")
                old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
                os.replace(self.dst, old)
                os.replace(self.tmp, self.dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.dst)
        except BaseException:
            self.abort()
            raise
        return self.dst

    def abort(self) -> None:
        """Remove the temp dir (idempotent)."""
        self._buf.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
