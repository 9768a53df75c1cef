"""Subject photo uploads: validation, copying into an instance folder, and sensible δ per p."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..core.bounds import parse_p
from ..core.config import check_rank
from ..fileio import atomic_dir

MIN_IMAGES = 3  # DreamBooth needs a few views of the subject
MAX_IMAGES = 30  # beyond this a subject run is a fine-tune, not a personalisation
RECOMMENDED_IMAGES = (5, 6)  # the DreamBooth paper's 3-5 views plus one spare
MAX_FILE_BYTES = 20 * 1024 * 1024  # a 24 MP JPEG is ~10 MB; anything larger is most likely not a photo
MAX_PIXELS = 64_000_000  # refuse decompression bombs before decoding
P_CHOICES = ("1", "2", "∞")  # nuclear, Frobenius, spectral bound


@dataclass
class UploadCheck:
    """Result of ``check_uploads``: the usable images and the warnings to show."""

    images: list[Path]
    warnings: list[str] = field(default_factory=list)


def _human_bytes(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


def _check_one(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(error or None, size) for one uploaded file, decoding it fully to catch truncated files."""
    try:
        nbytes = path.stat().st_size
    except OSError:
        return f"{path.name}: file is missing", None
    if nbytes > MAX_FILE_BYTES:
        return f"{path.name}: {_human_bytes(nbytes)} is over the {_human_bytes(MAX_FILE_BYTES)} limit", None
    if nbytes == 0:
        return f"{path.name}: file is empty", None
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                return f"{path.name}: {w}x{h} pixels is over the {MAX_PIXELS // 1_000_000} MP limit", None
            img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return f"{path.name}: not an image (upload JPEG, PNG or WebP photos)", None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt image data
        return f"{path.name}: cannot decode the image ({str(e).splitlines()[0]})", None
    return None, (w, h)


def check_uploads(paths: list[str | os.PathLike] | None, resolution: int | None = None) -> UploadCheck:
    """Validate uploaded subject photos.

    Raises ValueError (one line, naming every bad file) for non-images, corrupt or huge files and for
    fewer than MIN_IMAGES or more than MAX_IMAGES photos; returns warnings for a count outside the
    recommended 5-6, images smaller than ``resolution`` and duplicate files.
    """
    paths = [Path(p) for p in (paths or [])]
    if not paths:
        raise ValueError(f"upload {MIN_IMAGES}-{MAX_IMAGES} photos of the subject (5-6 work best)")
    if len(paths) > MAX_IMAGES:
        raise ValueError(f"{len(paths)} files uploaded; at most {MAX_IMAGES} photos are accepted")
    errors, warnings, images, sizes = [], [], [], {}
    for path in paths:
        error, size = _check_one(path)
        if error:
            errors.append(error)
        else:
            images.append(path)
            sizes[path] = size
    if errors:
        raise ValueError("; ".join(errors))
    if len(images) < MIN_IMAGES:
        raise ValueError(f"{len(images)} photo(s) uploaded; at least {MIN_IMAGES} are needed (5-6 work best)")
    lo, hi = RECOMMENDED_IMAGES
    if not lo <= len(images) <= hi:
        warnings.append(f"{len(images)} photos: {lo}-{hi} varied photos of the subject usually work best")
    if resolution:
        small = [p.name for p in images if min(sizes[p]) < resolution]
        if small:
            warnings.append(
                f"smaller than {resolution} px on the short side (will be upscaled): {', '.join(small)}"
            )
    seen: dict[str, str] = {}
    for p in images:
        key = hashlib.sha256(p.read_bytes()).hexdigest()
        if key in seen:
            warnings.append(f"{p.name} looks like a duplicate of {seen[key]}")
        seen.setdefault(key, p.name)
    return UploadCheck(images, warnings)


def save_instance_images(images: list[Path], dest: str | os.PathLike) -> Path:
    """Copy validated photos, byte for byte (EXIF kept: the trainer applies it), into a new folder.

    The folder is built under a temporary name and renamed, so a failed copy leaves nothing behind.
    """
    dest = Path(dest)
    if dest.exists():
        raise ValueError(f"instance folder already exists: {dest}")
    with atomic_dir(dest) as tmp:
        for i, path in enumerate(images):
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)[:40]
            shutil.copyfile(path, tmp / f"{i:02d}-{stem}{path.suffix.lower()}")
    return dest


# Typical per-direction singular values of a DreamBooth update on SD attention layers are a few
# tenths; a rank-r update with equal singular values σ has ‖W‖_Sp = σ·r^(1/p) (paper §3.1).
_SIGMA_RANGE = (0.25, 1.0)


def p_value(choice: str | float) -> float:
    """The Schatten exponent of a UI choice ("1", "2", "∞" or a number)."""
    return parse_p(choice)


def delta_range(p: str | float, rank: int) -> tuple[float, float]:
    """A sensible [low, high] range for δ given p and the rank (scales as r^(1/p))."""
    p = p_value(p)
    check_rank(rank)
    factor = 1.0 if math.isinf(p) else rank ** (1.0 / p)
    return _SIGMA_RANGE[0] * factor, _SIGMA_RANGE[1] * factor


def default_delta(p: str | float, rank: int) -> float:
    """The geometric middle of ``delta_range``, rounded to two significant digits."""
    lo, hi = delta_range(p, rank)
    return float(f"{math.sqrt(lo * hi):.2g}")


def delta_hint(p: str | float, rank: int) -> str:
    """One line explaining what δ bounds for this p, with a sensible range."""
    pv = p_value(p)
    lo, hi = delta_range(pv, rank)
    what = {1.0: "nuclear norm (sum of singular values)", 2.0: "Frobenius norm"}.get(
        pv, f"Schatten-{pv:g} norm"
    )
    if math.isinf(pv):
        what = "spectral norm (largest singular value)"
    return (
        f"δ bounds the {what} of each layer's update; for p = {'∞' if math.isinf(pv) else f'{pv:g}'} "
        f"and rank {rank}, {lo:.2g}–{hi:.2g} is a sensible range (smaller = closer to the base model)."
    )


def file_paths(files: Any) -> list[str]:
    """Paths from a gr.File value (str, list of str, or file objects with .name/.path)."""
    if not files:
        return []
    files = files if isinstance(files, (list, tuple)) else [files]
    out = []
    for f in files:
        path = (
            f if isinstance(f, (str, os.PathLike)) else getattr(f, "path", None) or getattr(f, "name", None)
        )
        if path:
            out.append(str(path))
    return out


def slug(text: str) -> str:
    """A file-name-safe short form of ``text`` (letters, digits, - and _)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text.strip())[:40].strip("-") or "run"
