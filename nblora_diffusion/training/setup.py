"""The setup steps of a run: input checks, accelerator, base model, output folder, class images, optimizer,
data loader. Each is a function of explicit arguments, called in order by ``train``; with them the two
pieces of process-wide state a run touches, each in one function: accelerate's state (its precision is fixed
once per process, ``check_process_precision``) and torch's TF32 flag (``tf32_matmuls``)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import diffusion
from ..devices import resolve_device
from ..fileio import atomic_write_text
from . import checkpoint as ckpt
from .caching import load_vae
from .config import TrainConfig
from .data import DreamBoothDataset, EpochSampler, Photo, collate, load_photos
from .optim import check_optimizer
from .optim import make_optimizer as build_optimizer
from .outputs import CONFIG_FILE, clear_previous_run, previous_run
from .sampling import ensure_class_images

log = logging.getLogger(__name__)


def check_inputs(config: TrainConfig) -> tuple[Path, Path | None, list[Photo]]:
    """Everything that can be checked before writing anything: options, folders, photos."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not config.instance_data_dir:
        raise ValueError("--instance_data_dir is required")
    if not config.instance_prompt:
        raise ValueError("--instance_prompt is required")
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    check_process_precision(config.mixed_precision)
    check_optimizer(config.optimizer)  # a missing bitsandbytes / prodigyopt: one line, nothing written
    if config.compile:
        check_compile(resolve_device(None).type)
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file")
    if config.overwrite_output_dir and config.resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir and --resume_from_checkpoint contradict each other")
    resume = ckpt.resolve_resume(out, config.resume_from_checkpoint)
    found = previous_run(out)
    if found and resume is None and config.resume_from_checkpoint:
        raise ValueError(
            f"--output_dir {out} holds a run ({found}) but no checkpoint to resume from; "
            "pass --overwrite_output_dir to start over"
        )
    if found and resume is None and not config.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {out} already holds a training run ({found}); pass --resume_from_checkpoint "
            "latest to continue it or --overwrite_output_dir to replace it"
        )
    photos = load_photos(config.instance_data_dir, config.resolution, "instance")
    return out, resume, photos


def check_compile(device_type: str) -> None:
    """--compile needs torch.compile with a working backend here: a one-line error says what is missing."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise ValueError(
            f"--compile needs torch.compile, which torch {torch.__version__} does not support on this "
            f"platform (Python {sys.version_info.major}.{sys.version_info.minor}); drop --compile"
        )
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("--compile on a GPU needs triton (pip install triton); drop --compile")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        raise ValueError("--compile on the CPU needs a C++ compiler (g++ or clang++); drop --compile")


def check_process_precision(mixed_precision: str) -> None:
    """One --mixed_precision per process: a one-line error when this process already trained with another.

    accelerate keeps one process-wide ``AcceleratorState`` and fixes its precision once; it has no public
    way to start over (its maintainers: one precision per process), so a run with another precision needs a
    new process. The app runs every training in a child process of its own (``train_in_child_process``).
    """
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return
    before = AcceleratorState().mixed_precision
    if before != mixed_precision:
        raise ValueError(
            f"--mixed_precision {mixed_precision}: this process already trained with {before!r} and "
            "accelerate fixes the precision once per process: start a new process (the app runs each "
            "training in its own; nblora_diffusion.training.train_in_child_process does the same)"
        )


def make_accelerator(config: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if config.report_to == "tensorboard" and not any(
        map(importlib.util.find_spec, ("tensorboard", "tensorboardX"))
    ):
        log.warning("tensorboard is not installed: logging to the CSV files only (pip install tensorboard)")
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / config.logging_dir)),
    )


@contextlib.contextmanager
def tf32_matmuls(allow: bool) -> Iterator[None]:
    """--allow_tf32: TF32 matmuls on a GPU inside; torch's process-wide flag is as it was once the block ends
    or raises, so later runs and generations in the same process (the app, tests) are unaffected."""
    before = torch.backends.cuda.matmul.allow_tf32
    if allow and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def load_base(config: TrainConfig, accelerator) -> tuple[object, torch.dtype, int]:
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        config.mixed_precision
    ]
    pipe = diffusion.load_pipeline(
        config.pretrained_model_name_or_path,
        weight_dtype,
        accelerator.device,
        config=config.base_model_config,
        allow_ckpt=config.allow_ckpt,
    )
    if config.pretrained_vae_model_name_or_path:
        vae = load_vae(config.pretrained_vae_model_name_or_path, pipe.vae, pipe.unet.config.in_channels)
        pipe.register_modules(vae=vae.to(accelerator.device))
    if pipe.vae.dtype != torch.float32:
        # the frozen VAE stays in float32 (SDXL's overflows in fp16); nn.Module.to, because diffusers' own
        # `to` warns about an empty list of float32 modules on every cast
        torch.nn.Module.to(pipe.vae, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    check_resolution(pipe, resolution)
    return pipe, weight_dtype, resolution


def check_resolution(pipe, resolution: int) -> None:
    """The VAE's downsampling times the UNet's must divide the resolution (×8·×4 for SD, ×2·×4 for the
    micro SD); a one-line error names both."""
    vae = pipe.vae_scale_factor
    unet = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if resolution % (vae * unet):
        raise ValueError(
            f"--resolution must be a multiple of {vae * unet} for this model (the VAE downsamples x{vae}, "
            f"the UNet x{unet}), got {resolution}"
        )


def prepare_output(config: TrainConfig, out: Path, accelerator) -> None:
    """Create the folder; --overwrite_output_dir removes what a previous run wrote (only that)."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite_output_dir:
            clear_previous_run(out, config.logging_dir)
        ckpt.remove_stale_temporaries(out)
    accelerator.wait_for_everyone()


def write_run_config(config: TrainConfig, out: Path, resume: Path | None, accelerator) -> None:
    """train_config.json, once every setup step has passed (a resumed run keeps the original)."""
    if accelerator.is_main_process and resume is None:
        atomic_write_text(out / CONFIG_FILE, config.to_json() + "\n", mode=0o644)


def class_photos(
    config: TrainConfig, pipe, resolution: int, sdxl: bool, seed: int, accelerator
) -> list[Photo] | None:
    if not config.with_prior_preservation:
        return None
    class_dir = Path(config.class_data_dir)
    if accelerator.is_main_process:
        ensure_class_images(
            pipe,
            class_dir,
            prompt=config.class_prompt,
            num=config.num_class_images,
            steps=config.class_inference_steps,
            resolution=resolution,
            seed=seed,
            batch_size=config.sample_batch_size,
            sdxl=sdxl,
        )
    accelerator.wait_for_everyone()
    return load_photos(class_dir, resolution, "class")[: config.num_class_images]


def make_optimizer(config: TrainConfig, params: list, num_processes: int):
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * num_processes
    return build_optimizer(
        config.optimizer,
        params,
        lr=lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )


def make_dataloader(
    config: TrainConfig, photos: list[Photo], classes: list[Photo] | None, resolution: int, seed: int
) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    dataset = DreamBoothDataset(photos, resolution, config.center_crop, config.random_flip, seed, classes)
    sampler = EpochSampler(len(dataset), seed)
    # a private generator: creating an epoch's iterator must not draw from the global RNG
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
