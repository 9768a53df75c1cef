"""Image generation during training: class images for prior preservation, and validation images.

Both run inside ``torch.random.fork_rng`` with their own seeded generator, so generating images
never moves the training RNG (a run with validation resumes exactly like one without).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .._deprecated import keyword_only_since
from .data import count_images
from .logs import save_image_atomic

log = logging.getLogger(__name__)


def _devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


@keyword_only_since(2, ("num", "steps", "resolution", "seed", "batch_size", "sdxl", "progress"))
@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    *,
    num: int,
    steps: int,
    resolution: int,
    seed: int,
    sdxl: bool,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[Image.Image]:
    """``num`` images of ``prompt`` from the pipeline as it is (with or without adapters), ``batch_size``
    at a time (default: all at once)."""
    batch_size = batch_size or num
    device = pipe.unet.device
    images: list[Image.Image] = []
    autocast = (
        torch.autocast(device.type, dtype=pipe.unet.dtype)
        if pipe.unet.dtype != torch.float32
        else contextlib.nullcontext()
    )
    modes = {
        m: m.training for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m
    }
    for m in modes:
        m.eval()
    try:
        with torch.random.fork_rng(devices=_devices(device)), autocast:
            generator = torch.Generator(device=device).manual_seed(seed)
            bar = tqdm(total=num, desc="class images", disable=not progress)
            while len(images) < num:
                n = min(batch_size, num - len(images))
                kwargs = {"original_size": (resolution, resolution)} if sdxl else {}
                out = pipe(
                    prompt=[prompt] * n,
                    num_inference_steps=steps,
                    height=resolution,
                    width=resolution,
                    generator=generator,
                    **kwargs,
                )
                images.extend(out.images)
                bar.update(n)
            bar.close()
    finally:
        for m, was_training in modes.items():
            m.train(was_training)
    return images


@keyword_only_since(2, ("prompt", "num", "steps", "resolution", "seed", "batch_size", "sdxl"))
def ensure_class_images(
    pipe,
    class_dir: Path,
    *,
    prompt: str,
    num: int,
    steps: int,
    resolution: int,
    seed: int,
    batch_size: int,
    sdxl: bool,
) -> int:
    """Top ``class_dir`` up to ``num`` images generated with the base model; returns how many were made.

    Each image is written atomically under a name with its content hash, so an interrupted run
    leaves only complete images and the next run generates just the missing ones.
    """
    class_dir.mkdir(parents=True, exist_ok=True)
    have = count_images(class_dir)
    missing = num - have
    if missing <= 0:
        return 0
    log.info("generating %d class images of %r in %s", missing, prompt, class_dir)
    images = generate(
        pipe,
        prompt,
        num=missing,
        steps=steps,
        resolution=resolution,
        seed=seed + have,
        batch_size=batch_size,
        sdxl=sdxl,
        progress=True,
    )
    for i, image in enumerate(images):
        digest = hashlib.sha1(image.tobytes()).hexdigest()[:12]
        save_image_atomic(image, class_dir / f"{have + i:05d}-{digest}.png")
    return missing
