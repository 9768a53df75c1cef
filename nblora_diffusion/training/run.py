"""What one training run holds and returns: the callbacks and result of ``train``, the run's state and its
prepared training objects, and the one error type of a run that cannot go on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .config import TrainConfig
from .methods import AdapterSetup
from .text import PromptEncoder
from .validation_metrics import ValidationMetrics


class TrainingError(ValueError):
    """A run that cannot go on (non-finite loss, out of memory); the message is one line."""


@dataclass
class TrainCallbacks:
    """Optional hooks, called on the main process after each optimizer step / validation / checkpoint."""

    on_step: Callable[[int, int, float, float, float], None] | None = (
        None  # step, max_steps, loss, lr, elapsed_s
    )
    on_validation: Callable[[int, list[Image.Image]], None] | None = None  # step, images
    on_checkpoint: Callable[[int, Path], None] | None = None  # step, checkpoint folder


@dataclass
class TrainResult:
    output_dir: Path
    final_step: int
    last_checkpoint: Path | None
    stopped: bool


@dataclass
class Run:
    """Everything one training run holds, built by the named steps of ``train``."""

    config: TrainConfig
    output_dir: Path
    accelerator: object
    pipe: object
    setup: AdapterSetup
    resolution: int
    sdxl: bool
    weight_dtype: torch.dtype
    data_seed: int
    global_step: int = 0
    last_checkpoint: Path | None = None
    offloaded: list = field(default_factory=list)  # cached-away VAE / text encoders, back for validation
    metrics: ValidationMetrics | None = None  # --validation_metrics: the suite and the base model's row


@dataclass
class Parts:
    """The prepared training objects (accelerate may have wrapped the models for DDP)."""

    models: list
    unet: object
    optimizer: object
    loader: object
    sampler: object
    lr_scheduler: object
    noise_scheduler: object
    prompts: PromptEncoder
    latents_of: object  # batch -> latents: caching.VAELatents or caching.LatentCache
