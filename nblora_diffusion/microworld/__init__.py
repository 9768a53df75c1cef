"""The micro world: a procedural image world, a pretrained micro Stable Diffusion that draws it, judges
that read its pictures back, and DreamBooth subjects the base model has never seen.

The shipped weights live in ``pretrained/`` (made by ``python -m nblora_diffusion.microworld pretrain``
and ``... judge``; see ``pretrained/micro-sd/microworld.json`` for the command, seed and time).
"""

from __future__ import annotations

from pathlib import Path

PRETRAINED = Path(__file__).resolve().parent / "pretrained"


def model_path() -> Path:
    """The pretrained micro SD: a diffusers StableDiffusionPipeline folder (for load_pipeline)."""
    path = PRETRAINED / "micro-sd"
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"the micro SD is missing from {path}; "
            "rebuild it with python -m nblora_diffusion.microworld pretrain"
        )
    return path


def judge_path() -> Path:
    path = PRETRAINED / "judge.safetensors"
    if not path.is_file():
        raise ValueError(
            f"the micro-world judge is missing: {path}; "
            "rebuild it with python -m nblora_diffusion.microworld judge"
        )
    return path
