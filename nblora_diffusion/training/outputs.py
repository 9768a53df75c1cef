"""What a run leaves in OUT/: the adapter (native + diffusers LoRA + optional kohya), and its checks.

Files are written to a temporary folder and moved into place one by one, the adapter config last,
so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..fileio import staging_dir
from ..formats import ADAPTER_CONFIG_FILE, DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE, TRAIN_CONFIG_FILE
from .config import TrainConfig
from .methods import AdapterSetup

KOHYA_FILE = KOHYA_LORA_FILE
CONFIG_FILE = TRAIN_CONFIG_FILE
# what a previous run leaves behind (used to refuse or to clean an output folder)
RUN_MARKERS = (CONFIG_FILE, ADAPTER_CONFIG_FILE, DIFFUSERS_LORA_FILE, "train_log.csv")
RUN_OUTPUTS = RUN_MARKERS + (KOHYA_FILE, "norms.csv", "norm_curves.png")


def instance_token(instance_prompt: str, class_prompt: str | None) -> str | None:
    """The identifier of the subject: the word of the instance prompt that the class prompt lacks."""
    words = instance_prompt.split()
    if class_prompt:
        extra = [w for w in words if w not in class_prompt.split()]
        if len(extra) == 1:
            return extra[0]
    rare = [w for w in words if w.lower() in ("sks", "zwx", "ohwx", "xjy", "tok")]
    return rare[0] if rare else None


def previous_run(output_dir: Path) -> str | None:
    """Name of the first file/folder showing that ``output_dir`` holds another run, or None."""
    if not output_dir.is_dir():
        return None
    for name in RUN_MARKERS:
        if (output_dir / name).exists():
            return name
    ckpts = sorted(output_dir.glob("checkpoint-*"))
    return ckpts[0].name if ckpts else None


def clear_previous_run(output_dir: Path, logging_dir: str) -> None:
    """Remove only what a run writes (--overwrite_output_dir); other files of the folder stay."""
    for name in RUN_OUTPUTS:
        (output_dir / name).unlink(missing_ok=True)
    for stale in output_dir.glob("nblora_*.safetensors"):
        stale.unlink()
    for folder in [
        *output_dir.glob("checkpoint-*"),
        *output_dir.glob(".checkpoint-*"),
        output_dir / "validation",
        output_dir / logging_dir,
    ]:
        if folder.is_dir():
            shutil.rmtree(folder)


def write_adapter(
    pipe, setup: AdapterSetup, folder: Path, config: TrainConfig, step: int, final: bool
) -> None:
    """The adapter alone in ``folder``: native NB-LoRA (final: plus the diffusers LoRA export and, with
    --export_kohya, the kohya file), or for baselines diffusers' pytorch_lora_weights.safetensors."""
    token = instance_token(config.instance_prompt, config.class_prompt)
    with staging_dir(folder) as tmp:
        setup.save(pipe, tmp, config, step, final, token)
        last = [p for p in tmp.iterdir() if p.name == ADAPTER_CONFIG_FILE]
        for p in [p for p in tmp.iterdir() if p not in last] + last:  # the config JSON goes in last
            os.chmod(p, 0o644)  # temporary files are private (0600); outputs are ordinary files
            os.replace(p, folder / p.name)
