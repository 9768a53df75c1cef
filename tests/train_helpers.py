"""Helpers shared by the training tests: the bundled dog photos and a TrainConfig for the tiny SD."""

from __future__ import annotations

from pathlib import Path

from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.training import TrainConfig

DOG = Path(__file__).resolve().parents[1] / "assets" / "dreambooth" / "dog"


def tiny_config(out: Path, **changes) -> TrainConfig:
    """A seeded run on the tiny SD at 32 px from the dog photos into ``out``; ``changes`` override."""
    values = dict(
        pretrained_model_name_or_path=str(tiny_sd_path()),
        instance_data_dir=str(DOG),
        instance_prompt="a photo of sks dog",
        output_dir=str(out),
        resolution=32,
        seed=0,
        report_to="none",
    )
    values.update(changes)
    return TrainConfig(**values)
