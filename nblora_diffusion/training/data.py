"""DreamBooth data: robust photo loading, deterministic augmentation and an epoch-seeded sampler.

Augmentation and shuffling draw from generators seeded by (seed, epoch, index), never from the
global RNG: the data a run sees then depends only on its position, which is what makes
kill-and-resume reproduce an uninterrupted run bit for bit (the accelerate data loader reads one
batch ahead, so global-RNG augmentation would shift on resume).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_MIX = 1_000_003  # prime mixing (seed, epoch, index) into one generator seed


@dataclass
class Photo:
    path: Path
    image: Image.Image  # RGB, EXIF orientation applied


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode: alpha composited on white, CMYK/palette/16-bit/float scaled correctly."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        elif image.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_photo(path: Path) -> Image.Image:
    """Decode one file fully (truncated files fail here, not mid-training) and orient it by EXIF."""
    with Image.open(path) as im:
        im.load()
        image = ImageOps.exif_transpose(im)
        return to_rgb(image).copy()


def load_photos(folder: str | Path, min_size: int | None = None, what: str = "instance") -> list[Photo]:
    """Every readable image in ``folder`` (not recursive), sorted by name.

    Unreadable or non-image files are skipped with a warning naming them; images smaller than
    ``min_size`` on their short side are kept (upsampled later) with a warning. No valid image
    -> ValueError.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"{what} data folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{what} data path is not a folder: {folder}")
    photos, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = open_photo(path)
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombWarning,
            Image.DecompressionBombError,
        ) as e:
            reason = "not an image" if isinstance(e, UnidentifiedImageError) else f"unreadable ({e})"
            log.warning("skipping %s: %s", path.name, reason)
            skipped.append(path.name)
            continue
        if min_size is not None and min(image.size) < min_size:
            log.warning(
                "%s is %dx%d, smaller than --resolution %d: it will be upsampled",
                path.name,
                *image.size,
                min_size,
            )
        photos.append(Photo(path, image))
    if not photos:
        detail = f" (skipped: {', '.join(skipped[:5])}{'...' if len(skipped) > 5 else ''})" if skipped else ""
        raise ValueError(f"no valid {what} images in {folder}{detail}")
    return photos


def count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(
        1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * _MIX + epoch) * _MIX + index) % (2**63))


class DreamBoothDataset(Dataset):
    """Instance photos (and class images for prior preservation), resized, cropped and flipped.

    Items: pixel_values (3, S, S) in [-1, 1], is_class, original_size (h, w) before cropping and
    crop_top_left (top, left) — SDXL's micro-conditioning — and latent_key (kind, index, flipped),
    which names the variant for a latent cache (``latent_variants``).
    """

    def __init__(
        self,
        instance: list[Photo],
        size: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        class_photos: list[Photo] | None = None,
    ) -> None:
        if not instance:
            raise ValueError("the dataset needs at least one instance image")
        self.size, self.center_crop, self.random_flip, self.seed = size, center_crop, random_flip, seed
        # resizing is deterministic: do it once; crops and flips vary per epoch
        self.instance = [self._resize(p.image) for p in instance]
        self.classes = [self._resize(p.image) for p in class_photos] if class_photos else []
        self.epoch = 0

    def _resize(self, image: Image.Image) -> Image.Image:
        return TF.resize(image, self.size, interpolation=InterpolationMode.BILINEAR, antialias=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def _center(self, image: Image.Image) -> tuple[int, int]:
        w, h = image.size
        return max(0, round((h - self.size) / 2)), max(0, round((w - self.size) / 2))

    def _pixels(self, image: Image.Image, top: int, left: int, flip: bool) -> torch.Tensor:
        image = TF.crop(image, top, left, self.size, self.size)
        if flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), [0.5], [0.5])  # (3, S, S) in [-1, 1]

    def _example(self, image: Image.Image, g: torch.Generator, kind: str, index: int) -> dict:
        w, h = image.size
        s = self.size
        if self.center_crop:
            top, left = self._center(image)
        else:
            top = int(torch.randint(0, h - s + 1, (), generator=g))
            left = int(torch.randint(0, w - s + 1, (), generator=g))
        flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
        return {
            "pixel_values": self._pixels(image, top, left, flip),
            "original_size": (h, w),
            "crop_top_left": (top, left),
            "latent_key": (kind, index, flip),
        }

    def __getitem__(self, index: int) -> dict:
        g = item_generator(self.seed, self.epoch, index)
        i = index % len(self.instance)
        out = {"instance": self._example(self.instance[i], g, "instance", i)}
        if self.classes:
            j = index % len(self.classes)
            out["class"] = self._example(self.classes[j], g, "class", j)
        return out

    def latent_variants(self) -> Iterator[tuple[tuple[str, int, bool], torch.Tensor]]:
        """(latent_key, pixels (3, S, S)) of every image variant an epoch can draw: each image, flipped
        and not with ``random_flip``. Random crops must be unique (square images or ``center_crop``)."""
        for kind, images in (("instance", self.instance), ("class", self.classes)):
            for i, image in enumerate(images):
                if not self.center_crop and image.size[0] != image.size[1]:
                    raise ValueError(f"{kind} image {i} is not square: its random crops have many latents")
                top, left = self._center(image)  # (0, 0), the only random crop, for a square image
                for flip in (False, True) if self.random_flip else (False,):
                    yield (kind, i, flip), self._pixels(image, top, left, flip)


def collate(examples: list[dict]) -> dict:
    """Instance examples first, then class examples (the loss splits the batch in two halves)."""
    parts = [e["instance"] for e in examples] + [e["class"] for e in examples if "class" in e]
    return {
        "pixel_values": torch.stack([p["pixel_values"] for p in parts]).contiguous(),
        "original_size": torch.tensor([p["original_size"] for p in parts]),
        "crop_top_left": torch.tensor([p["crop_top_left"] for p in parts]),
        "latent_keys": [p["latent_key"] for p in parts],
        "num_instance": len(examples),
    }


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, seeded by (seed, epoch): no hidden generator state to save."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * _MIX + self.epoch) % (2**63))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
