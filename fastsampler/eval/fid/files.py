"""Atomic writes and checksums of the files a FID run leaves: shards, reference statistics, tables.

A file is written to a temporary name in its folder and ``os.replace``-d onto its own, so a killed run never leaves
a half-written file under a name a rerun would trust."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s directory, then ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically."""
    from safetensors.torch import save_file

    _atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                              metadata=metadata))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(images.detach().cpu().numpy())).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
