"""Helpers shared by the training tests: the bundled dog photos, a TrainConfig for the tiny SD, and trainers
that fail, at module level so that a child process (``train_in_child_process``) can import them."""

from __future__ import annotations

import os
import signal
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


def fail_after_a_step(config, callbacks, should_stop):
    """A trainer whose own failure is not a ValueError (multi-line, to check the page gets one line)."""
    callbacks.on_step(1, 2, 0.5, 1e-3, 0.1)
    raise RuntimeError("boom\nsecond line")


def exit_without_a_word(config, callbacks, should_stop):
    """A trainer whose process ends at once: no result, no error sent."""
    os._exit(3)


def get_killed(config, callbacks, should_stop):
    """A trainer whose process is killed (as by the out-of-memory killer)."""
    os.kill(os.getpid(), signal.SIGKILL)
