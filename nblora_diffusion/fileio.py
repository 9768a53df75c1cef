"""Atomic writes: the one place where a file or folder goes to a temporary name and is renamed over its
destination (``os.replace``), so a reader never sees a half-written file and an interrupted write leaves
only a dot-named temporary, which is removed on error.

Temporary names keep the destination's suffix (``.x.png.abc123.tmp.png``) because PIL and matplotlib pick
the format from it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary path next to ``path``: write it in the block; on success it replaces ``path``.

    ``mode`` sets the permissions of the result (the temporary file is private, 0600, like mkstemp's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) atomically; returns the path."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data, *, mode: int | None = None, **dump_kwargs) -> Path:
    """Write ``data`` as JSON (``json.dumps(data, **dump_kwargs)`` plus a newline) atomically."""
    return atomic_write_text(path, json.dumps(data, **dump_kwargs) + "\n", mode=mode)


@contextmanager
def atomic_dir(dest: str | os.PathLike, *, mode: int | None = None) -> Iterator[Path]:
    """A temporary folder next to ``dest``: fill it in the block; on success it is renamed to ``dest``.

    ``dest`` must not exist when the block ends (an empty folder is replaced); on error the temporary
    folder and everything in it is removed. ``mode`` sets the folder's permissions (mkdtemp's are 0700).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        yield tmp
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staging_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder inside ``folder`` for files that are then moved in one by one (``move_in``);
    removed at the end whatever happens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".staging.", suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
