"""Evaluate tab: the DreamBooth metrics (nblora_diffusion.metrics) on the images the app generated."""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from ..metrics import (
    MetricConfig,
    MetricSuite,
    MicroWorldConfig,
    MicroWorldSuite,
    list_images,
    make_suite,
    strip_token,
)
from .generation import read_adapter_info

GROUP_COLUMNS = ("images", "variant", "δ'")


def subject_photos(folder: str | os.PathLike) -> str | None:
    """The training photos of an adapter: ``instance_data_dir`` of its train_config.json (or its parent's,
    for a checkpoint), when that folder still exists."""
    folder = Path(folder)
    for cfg in (folder / "train_config.json", folder.parent / "train_config.json"):
        try:
            photos = json.loads(cfg.read_text()).get("instance_data_dir")
        except (OSError, ValueError, AttributeError):
            continue
        if photos and Path(photos).is_dir():
            return str(photos)
    return None


class Evaluator:
    """Loads the metric models once (on first use) and scores groups of generated images."""

    def __init__(self, config: MetricConfig | MicroWorldConfig | None = None) -> None:
        self.config = config or MetricConfig()
        self._suite: MetricSuite | MicroWorldSuite | None = None
        self._lock = threading.Lock()

    def suite(self) -> MetricSuite | MicroWorldSuite:
        with self._lock:
            if self._suite is None:
                self._suite = make_suite(self.config).load()  # ValueError naming a missing model
            return self._suite

    @property
    def columns(self) -> list[str]:
        return list(GROUP_COLUMNS) + list(self.config.metrics)

    def score(
        self, adapter: str | os.PathLike, photos: str | os.PathLike | None, settings: list[dict]
    ) -> list[list]:
        """One table row (``columns``) per (variant, δ') group of the generated images in ``settings``.

        ``settings`` is the Generate tab's list (each with "file", "prompt", "variant", "delta_prime").
        CLIP-T compares with the prompt without the adapter's token.
        """
        if not settings:
            raise ValueError("generate some images first (the Generate tab)")
        info = read_adapter_info(adapter)
        photos = photos or subject_photos(info.folder)
        if not photos:
            raise ValueError("give the folder of the subject photos to compare with")
        real = list_images(photos)
        groups: dict[tuple, list[Image.Image]] = {}
        prompts: dict[tuple, str] = {}
        for s in settings:
            path = Path(str(s.get("file", "")))
            if not path.is_file():
                raise ValueError(f"generated image not found: {path} (generate again)")
            key = (s.get("variant", "adapter"), float(s.get("delta_prime", math.nan)))
            with Image.open(path) as im:
                groups.setdefault(key, []).append(im.convert("RGB"))
            prompts.setdefault(key, s.get("prompt", ""))
        keys = sorted(groups, key=lambda k: (k[0] != "base", k[1]))
        texts = [strip_token(prompts[k], info.token or "") for k in keys]
        rows = []
        for key, text in zip(keys, texts, strict=True):
            stats = self.suite().score(real, [groups[key]], [text])
            rows.append(
                [len(groups[key]), key[0], key[1]] + [_round(stats[m].mean) for m in self.config.metrics]
            )
        return rows


def _round(x: Any) -> float | None:
    """4 decimals; None for NaN (LPIPS diversity of a single image has no pairs)."""
    x = float(x)
    return None if math.isnan(x) else round(x, 4)
