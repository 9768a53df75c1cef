"""What ``make demo`` shows: the slider grid of a trained micro-world adapter, with the judges' reading."""

from __future__ import annotations

import os
from pathlib import Path

GRID_FILE = "slider_grid.png"
SCALES = (0.0, 0.5, 1.0, 2.0)  # δ' = 0 (the base model exactly), δ/2, δ, 2δ


def demo_prompts(token: str, class_noun: str) -> list[str]:
    return [
        f"a photo of {token} {class_noun}",
        f"a photo of {token} {class_noun} on a green background",
        f"a photo of {token} {class_noun} on the left",
        f"a photo of a {class_noun} on a purple background",  # no token: should stay the base model's
    ]


def slider_grid(
    base_model: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    seeds: int = 4,
) -> tuple[Path, dict[str, list[float]]]:
    """Grid: rows = prompts, columns = the base model and the adapter at δ' = 0, δ/2, δ, 2δ (first seed).
    Returns the PNG's path and, per prompt and δ', the fraction of ``seeds`` images the judge reads as the
    subject."""
    from ..diffusion import load_adapter, load_pipeline
    from ..diffusion.grid import image_grid, slider_images
    from ..metrics import MicroWorldSuite
    from ..metrics.microworld import to_tensor

    pipe = load_pipeline(base_model)
    pipe.set_progress_bar_config(disable=True)
    info = load_adapter(pipe, adapter_dir)
    token = info.get("token") or "sks"
    prompt = info.get("instance_prompt") or f"a photo of {token} circle"
    class_noun = prompt.split()[-1]
    prompts = demo_prompts(token, class_noun)
    runs = [slider_images(pipe, prompts, SCALES, seed=seed + 100 * k) for k in range(seeds)]
    rows = runs[0]
    delta = float(info.get("delta") or 1.0)
    labels = ["base", "δ'=0", f"δ'={0.5 * delta:g}", f"δ'={delta:g}", f"δ'={2 * delta:g}"]
    rows = [[row[0], *row] for row in rows]  # the base column: δ' = 0 is the base model exactly
    path = Path(out or Path(adapter_dir) / GRID_FILE)
    image_grid(rows, labels, prompts, cell=96).save(path)
    suite = MicroWorldSuite().load()
    from .subjects import BY_NAME

    subject = next((s for s in BY_NAME.values() if s.kind == class_noun), None)
    readings: dict[str, list[float]] = {}
    for i, p in enumerate(prompts):
        readings[p] = []
        for j in range(len(SCALES)):
            read = suite.read(to_tensor([run[i][j] for run in runs]))
            hits = [
                subject is not None and k == subject.kind and q == subject.pattern
                for k, q in zip(read["kind"], read["pattern"], strict=True)
            ]
            readings[p].append(sum(hits) / len(hits))
    return path, readings
