"""Resumable checkpoints: OUT/checkpoint-N/ written to a temporary folder and renamed into place.

A checkpoint holds accelerate's state (optimizer, LR scheduler, grad scaler, every RNG), the exact
trainable tensors with the run state (step, data seed), and the adapter alone in its usual layout
(nblora_config.json + native files, or pytorch_lora_weights.safetensors for baselines), so that
evaluation can load any checkpoint like a final adapter.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file

from ..core import atomic_save_safetensors

log = logging.getLogger(__name__)

STATE_FILE = "training_state.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are not listed)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def remove_stale_temporaries(output_dir: Path) -> None:
    """Folders of checkpoints that were being written when a run was killed."""
    for p in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from: "latest" (None if there is none yet) or an explicit path."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            log.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s, starting a new run", output_dir
            )
            return None
        return found[-1][1]
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint: no checkpoint folder {resume}")
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint: {path} is not a checkpoint of this trainer ({STATE_FILE} missing)"
        )
    return path


def write_state(folder: Path, tensors: dict, run_state: dict) -> None:
    atomic_save_safetensors(tensors, folder / STATE_FILE, {"run_state": json.dumps(run_state)})


def read_state(folder: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    path = folder / STATE_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), json.loads(meta["run_state"])
    except Exception as e:  # corrupt or foreign file: one line
        raise ValueError(f"cannot read checkpoint state {path}: {e}") from None


def begin(output_dir: Path, step: int) -> Path:
    """An empty temporary folder for checkpoint <step> (a fixed name, shared by all processes)."""
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, output_dir: Path, step: int) -> Path:
    """Rename a fully written temporary folder to checkpoint-<step>, replacing an older one."""
    final = output_dir / f"checkpoint-{step}"
    if final.exists():  # re-saving a step (a stop right after a scheduled checkpoint): swap, then drop
        old = output_dir / f".checkpoint-{step}.old.tmp"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def prune(output_dir: Path, limit: int | None) -> None:
    """Keep the newest ``limit`` checkpoints."""
    if limit is None:
        return
    found = checkpoints(output_dir)
    for _, path in found[: max(0, len(found) - limit)]:
        log.info("removing old checkpoint %s (--checkpoints_total_limit %d)", path.name, limit)
        shutil.rmtree(path, ignore_errors=True)
