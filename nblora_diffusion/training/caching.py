"""Memory savers of the trainer: latents and prompt embeddings computed once (the VAE and the frozen text
encoders then leave the accelerator), and another VAE for the base model.

Cached latents keep the VAE's latent *distribution* (mean and log-variance, ``DiagonalGaussianDistribution``'s
parameters) of every image variant, and each step samples it exactly as the VAE's own posterior does, from
the global RNG: a cached run draws the same random numbers in the same order as an uncached one. Both encode
one image at a time (batched convolutions round differently, and Adam's first steps amplify last-bit
differences), so the two train exactly the same adapter.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .data import Photo

log = logging.getLogger(__name__)

LatentKey = tuple[str, int, bool]  # (instance | class, image index, flipped)


def _scaled_sample(moments: torch.Tensor, vae) -> torch.Tensor:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(moments).sample() * vae.config.scaling_factor  # (B, 4, S/8, S/8)
    # contiguous: the VAE's convolutions may return a channels-last layout, and the loss's randn_like(latents)
    # then draws from the RNG in another order and amount (CPU normal_ has a vectorised contiguous path),
    # which would make a cached run (contiguous moments) draw other noise than an uncached one
    return latents.contiguous()


def _moments(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's parameters (B, 8, S/8, S/8) of pixels (B, 3, S, S), one image at a time: the
    same numbers as the cache's, and the encoder's activations of one image only."""
    return torch.cat([vae.encode(p[None]).latent_dist.parameters for p in pixels])


class VAELatents:
    """Latents of a batch encoded by the VAE every step (no cache)."""

    def __init__(self, vae) -> None:
        self.vae = vae

    def __call__(self, batch: dict) -> torch.Tensor:
        vae = self.vae
        pixels = batch["pixel_values"].to(next(vae.parameters()).device, vae.dtype)
        with torch.no_grad():
            return _scaled_sample(_moments(vae, pixels), vae)


class LatentCache:
    """Latent distributions of every image variant (``DreamBoothDataset.latent_variants``), encoded once.

    The moments (8, S/8, S/8) per variant stay in CPU memory; a batch's are stacked and moved to
    ``device`` and sampled there, as the VAE would sample them.
    """

    def __init__(self, moments: dict[LatentKey, torch.Tensor], vae, device: torch.device) -> None:
        self.moments, self.vae, self.device = moments, vae, torch.device(device)

    @classmethod
    def build(cls, vae, dataset, device: torch.device) -> LatentCache:
        moments = {}
        with torch.no_grad():
            for key, pixels in dataset.latent_variants():
                moments[key] = _moments(vae, pixels[None].to(device, vae.dtype))[0].float().cpu()
        log.info("cached the latents of %d image variants", len(moments))
        return cls(moments, vae, device)

    def __call__(self, batch: dict) -> torch.Tensor:
        stacked = torch.stack([self.moments[tuple(k)] for k in batch["latent_keys"]])  # (B, 8, S/8, S/8)
        return _scaled_sample(stacked.to(self.device), self.vae)


def resized_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(w, h) after ``TF.resize(image, short)``: the short side becomes ``short``, the long one is floored."""
    w, h = size
    if w <= h:
        return short, int(short * h / w)
    return int(short * w / h), short


def check_latent_cache(
    photos: list[Photo], classes: list[Photo] | None, resolution: int, center_crop: bool
) -> None:
    """--cache_latents without --center_crop: every photo must have one crop only (square after resizing);
    otherwise each epoch's random crop would need its own latent. One line naming the first photo."""
    if center_crop:
        return
    for p in [*photos, *(classes or [])]:
        w, h = resized_size(p.image.size, resolution)
        if w != h:
            raise ValueError(
                f"--cache_latents with random crops: {p.path.name} ({p.image.size[0]}x{p.image.size[1]}) has "
                f"many {resolution} px crops, each its own latent; add --center_crop or crop it square"
            )


def offload(modules: list[nn.Module], device: torch.device) -> None:
    """Move frozen modules off the accelerator (to the CPU) once their outputs are cached."""
    if torch.device(device).type == "cpu":
        return
    for m in modules:
        torch.nn.Module.to(m, "cpu")  # nn.Module.to: diffusers' own `to` warns on float32 modules
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def onloaded(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Offloaded modules back on ``device`` for a while (validation images need the VAE and text encoders)."""
    if not modules or torch.device(device).type == "cpu":
        yield
        return
    for m in modules:
        torch.nn.Module.to(m, device)
    try:
        yield
    finally:
        offload(modules, device)


def load_vae(name_or_path: str, base_vae, latent_channels: int):
    """--pretrained_vae_model_name_or_path: an AutoencoderKL in float32 from a diffusers VAE folder (or a
    pipeline folder with vae/), a hub id, or one .safetensors file read with the base model's VAE config;
    offline for files. It must make latents of the base model's shape. ValueError (one line) otherwise."""
    from diffusers import AutoencoderKL

    from ..diffusion.single_file import is_single_file

    name = str(name_or_path)
    path = Path(name).expanduser()
    what = f"--pretrained_vae_model_name_or_path {name}"
    try:
        if is_single_file(name):
            if not path.is_file():
                raise ValueError(f"{what}: file not found")
            if path.suffix.lower() != ".safetensors":
                raise ValueError(f"{what}: a VAE file must be .safetensors (convert the .ckpt)")
            with tempfile.TemporaryDirectory() as config_dir:
                base_vae.save_config(config_dir)  # the architecture: the base model's own VAE config
                vae = AutoencoderKL.from_single_file(
                    str(path), config=config_dir, local_files_only=True, torch_dtype=torch.float32
                )
        else:
            if path.exists():
                if not path.is_dir():
                    raise ValueError(f"{what}: expected a VAE folder or a .safetensors file")
                sub = "vae" if not (path / "config.json").is_file() and (path / "vae").is_dir() else None
                if not (path / (sub or "") / "config.json").is_file():
                    raise ValueError(f"{what}: no config.json (nor vae/config.json): not a diffusers VAE")
                name = str(path)
            else:
                sub = None
            vae = AutoencoderKL.from_pretrained(name, subfolder=sub, torch_dtype=torch.float32)
    except ValueError as e:
        if str(e).startswith(what):
            raise
        raise ValueError(f"{what}: cannot load it ({_first_line(e)})") from None
    except Exception as e:  # diffusers / hub errors come in many types
        raise ValueError(f"{what}: cannot load it ({_first_line(e)})") from None
    got = (vae.config.latent_channels, len(vae.config.block_out_channels))
    want = (latent_channels, len(base_vae.config.block_out_channels))
    if got != want:
        raise ValueError(
            f"{what} makes latents of {got[0]} channels at 1/{2 ** (got[1] - 1)} scale; the base model needs "
            f"{want[0]} channels at 1/{2 ** (want[1] - 1)}"
        )
    return vae.requires_grad_(False).eval()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
