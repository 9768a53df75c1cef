"""Loading Stable Diffusion pipelines (SD1.x/2.x or SDXL, auto-detected) and naming their parts."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..devices import resolve_device
from ..formats import is_hub_id
from .single_file import SINGLE_FILE_SUFFIXES, is_single_file, load_single_file, pipeline_class

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
_SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32/float16/bfloat16 or one of their names ("fp16", "bf16", "float32", ...)."""
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ValueError(f"pipeline dtype must be float32, float16 or bfloat16, got {dtype!r}")


def load_pipeline(
    model_name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = "cpu",
    *,
    config: str | os.PathLike | None = None,
    allow_ckpt: bool = False,
):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline from a folder, a hub id or one checkpoint file.

    Accepts a local diffusers folder (the class from its model_index.json), a hub id already in the local
    cache (the hub is never contacted when HF_HUB_OFFLINE=1), or a single-file checkpoint (.safetensors;
    .ckpt only with ``allow_ckpt=True``), loaded offline with the shipped configs for the architecture
    its keys show, or with ``config`` (a skeleton name or a diffusers folder, see
    ``single_file.load_single_file``), onto ``device`` (None: cuda when present). Raises ValueError with
    a one-line message for a device this machine lacks (``resolve_device``), a missing path,
    a folder that is not a diffusers pipeline, an unsupported pipeline class or checkpoint.
    """
    from diffusers import DiffusionPipeline

    dtype = parse_dtype(dtype)
    device = resolve_device(device)
    name = str(model_name_or_path)
    path = Path(name).expanduser()
    if is_single_file(name) and not path.is_dir():  # a file, even where it looks like "owner/x.safetensors"
        if not path.exists():
            raise ValueError(f"model path not found: {path}")
        return load_single_file(path, dtype, config=config, allow_ckpt=allow_ckpt).to(device)
    if config is not None:
        raise ValueError(f"config= applies to single-file checkpoints, not to {name}")
    if path.exists() or not is_hub_id(name):
        if not path.exists():
            raise ValueError(f"model path not found: {path}")
        if path.is_file():
            raise ValueError(
                f"{path} is a file; expected a diffusers pipeline folder (with model_index.json) "
                f"or a checkpoint file ({' or '.join(SINGLE_FILE_SUFFIXES)})"
            )
        class_name = pipeline_class(path, str(path))
        if class_name not in _SUPPORTED:
            raise ValueError(f"{path} holds a {class_name}; supported are {', '.join(_SUPPORTED)}")
    try:
        pipe = DiffusionPipeline.from_pretrained(name, dtype=dtype)
    except Exception as e:  # hub/loader errors come in many types; one clear line for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load pipeline {name!r}: {first}") from None
    if type(pipe).__name__ not in _SUPPORTED and not _is_sd_like(pipe):
        raise ValueError(f"{name} holds a {type(pipe).__name__}; supported are {', '.join(_SUPPORTED)}")
    return pipe.to(device)


def _is_sd_like(pipe) -> bool:
    return isinstance(getattr(pipe, "unet", None), nn.Module) and isinstance(
        getattr(pipe, "text_encoder", None), nn.Module
    )


def is_sdxl(pipe) -> bool:
    """True for SDXL-style pipelines (two text encoders and text-time conditioning in the UNet)."""
    unet = getattr(pipe, "unet", None)
    return (
        getattr(pipe, "text_encoder_2", None) is not None
        and unet is not None
        and getattr(unet.config, "addition_embed_type", None) == "text_time"
    )


def architecture(pipe) -> str:
    """ "sdxl", "sd2" (Linear transformer projections) or "sd1" (Conv2d projections)."""
    if not _is_sd_like(pipe):
        raise ValueError(
            f"expected a Stable Diffusion pipeline with a unet and a text_encoder, got {type(pipe).__name__}"
        )
    if is_sdxl(pipe):
        return "sdxl"
    return "sd2" if getattr(pipe.unet.config, "use_linear_projection", False) else "sd1"


def components(pipe) -> dict[str, nn.Module]:
    """The adaptable parts of a pipeline: unet, text_encoder and (SDXL) text_encoder_2."""
    names = ("unet",) + TEXT_ENCODERS
    return {n: getattr(pipe, n) for n in names if isinstance(getattr(pipe, n, None), nn.Module)}
