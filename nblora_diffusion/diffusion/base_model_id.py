"""The identity of a base model file: its name and a content hash, so that an adapter trained on one
checkpoint file refuses another (``same_base_model``) while renames pass."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

_HASH_SAMPLES = 16  # 64 KiB samples spread over the file, besides the first MiB and the size


def is_single_file(path: str | os.PathLike) -> bool:
    """A name ending in .safetensors or .ckpt (whether or not the file exists)."""
    return str(path).lower().endswith(SINGLE_FILE_SUFFIXES)


def base_model_id(path: str | os.PathLike) -> str:
    """The file name and a content hash, ``name@<16 hex>``: sha256 of the size, the first MiB and 16 spread
    64 KiB samples.

    The first MiB alone (header plus the alphabetically first tensors, the text encoder's) is the same
    for two fine-tunes that share their text encoder and size; the samples reach the UNet. Reading ~2 MiB
    keeps this instant for multi-GB files. Renaming a file keeps its hash.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"base model file not found: {path}")
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    block = 1 << 16
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        for i in range(1, _HASH_SAMPLES + 1):
            f.seek(max(0, size - block) * i // _HASH_SAMPLES)
            digest.update(f.read(block))
    return f"{path.name}@{digest.hexdigest()[:16]}"


def same_base_model(a: str, b: str) -> bool:
    """Two ``base_model_id`` strings name the same content (file names may differ)."""
    return a.rpartition("@")[2] == b.rpartition("@")[2]


def file_base_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """``base_model_id`` of an existing checkpoint file; None for a folder, a hub id or None."""
    if (
        name_or_path is None
        or not is_single_file(name_or_path)
        or not Path(name_or_path).expanduser().is_file()
    ):
        return None
    return base_model_id(name_or_path)
