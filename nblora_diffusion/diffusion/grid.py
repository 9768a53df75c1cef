"""The slider grid: a few prompts (rows) drawn by the base model and by the adapter at several δ'."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from .inference import get_norm_bound, set_norm_bound


@torch.no_grad()
def slider_images(
    pipe,
    prompts: Sequence[str],
    scales: Sequence[float],
    *,
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
) -> list[list[Image.Image]]:
    """images[i][j]: prompt i at δ' = scales[j]·δ, every image from the same seed (so the columns differ
    by the adapter alone; scale 0 is the base model exactly). Restores the slider afterwards."""
    before = get_norm_bound(pipe)["scale"]
    rows: list[list[Image.Image]] = [[] for _ in prompts]
    try:
        for scale in scales:
            set_norm_bound(pipe, scale=scale)
            gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
            out = pipe(
                prompt=list(prompts),
                generator=gens,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            ).images
            for row, image in zip(rows, out, strict=True):
                row.append(image)
    finally:
        set_norm_bound(pipe, scale=before)
    return rows


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    column_labels: Sequence[str],
    row_labels: Sequence[str],
    cell: int = 96,
) -> Image.Image:
    """Rows of images (upscaled to ``cell`` px, nearest-neighbour for small pictures) with labels."""
    font = label_font()
    width = max((draw_width(font, label) for label in row_labels), default=0)
    left, top = 12 + width, 20
    grid = Image.new("RGB", (left + cell * len(column_labels), top + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(column_labels):
        draw.text((left + j * cell + 4, 3), label, fill="black", font=font)
    for i, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        draw.text((4, top + i * cell + cell // 2 - 7), label, fill="black", font=font)
        for j, image in enumerate(row):
            resample = Image.NEAREST if image.width < cell else Image.BICUBIC
            grid.paste(image.resize((cell, cell), resample), (left + j * cell, top + i * cell))
    return grid


def draw_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)


def label_font(size: int = 12):
    """DejaVu Sans (shipped with matplotlib: it has δ), else Pillow's own scalable font."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default(size=size)
