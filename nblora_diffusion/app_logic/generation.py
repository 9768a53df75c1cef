"""Generation with a trained adapter: pipeline cache, the norm-bound slider, image settings, downloads."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from ..devices import resolve_device
from ..fileio import atomic_dir, atomic_path
from ..formats import ADAPTER_CONFIG_FILE, DIFFUSERS_LORA_FILE, KOHYA_LORA_FILE, is_hub_id

CONFIG_NAME = ADAPTER_CONFIG_FILE
DIFFUSERS_FILE = DIFFUSERS_LORA_FILE
KOHYA_FILE = KOHYA_LORA_FILE
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class AdapterInfo:
    """What the app needs to know about an adapter folder (from its nblora_config.json)."""

    folder: Path
    config: dict
    delta: float  # the trained bound (δ, or γ for a relative bound); the slider's δ' = scale·δ
    relative: bool  # True when the bound is relative to each base weight (γ)
    base_model: str | None
    token: str | None

    @property
    def label(self) -> str:
        p = self.config.get("p")
        p = f"{p:g}" if isinstance(p, (int, float)) else str(p).replace("inf", "∞")
        return f"{self.folder.name} (p={p}, {'γ' if self.relative else 'δ'}={self.delta:g})"


def read_adapter_info(folder: str | os.PathLike) -> AdapterInfo:
    """Parse ``folder/nblora_config.json``; ValueError with one line if the folder is not an adapter."""
    from ..diffusion import read_adapter_config

    text = str(folder or "").strip()
    if not text:
        raise ValueError("no adapter folder given")
    path = Path(text).expanduser()
    cfg = read_adapter_config(path)
    relative = cfg.get("delta") is None
    bound = cfg.get("gamma") if relative else cfg.get("delta")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0:
        raise ValueError(f"{path / CONFIG_NAME} has no positive norm bound (delta or gamma)")
    return AdapterInfo(path.resolve(), cfg, float(bound), relative, cfg.get("base_model"), cfg.get("token"))


def find_adapters(root: str | os.PathLike) -> list[Path]:
    """Adapter folders directly under ``root`` (not their checkpoints), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and (d / CONFIG_NAME).is_file()]
    return sorted(found, key=lambda d: (d / CONFIG_NAME).stat().st_mtime, reverse=True)


def _files_key(folder: Path) -> tuple:
    return tuple(
        sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in folder.iterdir() if f.is_file())
    )


class PipelineCache:
    """One base pipeline kept in memory with at most one adapter loaded (unmerged, so scale 0 is the base).

    Use ``with cache.lock:`` around anything that runs the pipeline: generation, slider, export.
    """

    def __init__(
        self,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        base_model_config: str | os.PathLike | None = None,
    ) -> None:
        self.device = str(resolve_device(device))
        # a local diffusers folder with the configs of single-file base models (load_pipeline's config=)
        self.base_model_config = str(base_model_config) if base_model_config else None
        self.dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self.lock = threading.RLock()
        self._pipe: Any = None
        self._base: str | None = None
        self._adapter: tuple[Path, tuple] | None = None

    def _load_base(self, base_model: str) -> Any:
        from ..diffusion import load_pipeline
        from ..diffusion.single_file import is_single_file

        if self._pipe is None or self._base != base_model:
            self._pipe = None  # drop the old one before loading a second model
            self._adapter = None
            config = self.base_model_config if is_single_file(base_model) else None  # folders have their own
            pipe = load_pipeline(base_model, dtype=self.dtype, device=self.device, config=config)
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._base = pipe, base_model
        return self._pipe

    def _drop_adapter(self) -> None:
        from ..diffusion import adapted_components, remove_adapter

        if self._pipe is not None and adapted_components(self._pipe):
            remove_adapter(self._pipe, merge=False)
        self._adapter = None

    def base(self, base_model: str) -> Any:
        """The base pipeline with no adapter."""
        with self.lock:
            pipe = self._load_base(base_model)
            if self._adapter is not None:
                self._drop_adapter()
            return pipe

    def with_adapter(
        self, folder: str | os.PathLike, fallback_base: str | None = None
    ) -> tuple[Any, AdapterInfo]:
        """The pipeline with the adapter in ``folder`` loaded (reloaded if its files changed).

        The base model is the adapter's own; ``fallback_base`` is used when that is a local folder that no
        longer exists (or was not recorded).
        """
        from ..diffusion import load_adapter

        info = read_adapter_info(folder)
        base = info.base_model
        if not _available(base):
            if not fallback_base:
                raise ValueError(
                    f"the adapter's base model {base!r} is not available; start the app with --base_model"
                )
            base = fallback_base
        with self.lock:
            pipe = self._load_base(base)
            key = (info.folder, _files_key(info.folder))
            if self._adapter != key:
                self._drop_adapter()
                try:
                    load_adapter(pipe, info.folder)
                except BaseException:
                    self._drop_adapter()
                    raise
                self._adapter = key
            return pipe, info


def _available(base_model: str | None) -> bool:
    """A local folder that exists, or a hub id (loaded from the cache or the hub)."""
    return bool(base_model) and (Path(base_model).expanduser().exists() or is_hub_id(base_model))


def resolve_seed(seed: Any, randomize: bool = False) -> int:
    """A seed in [0, 2^32 - 1]; a fresh random one when ``randomize`` or seed is empty or negative."""
    if randomize or seed is None or seed == "":
        return random.SystemRandom().randrange(MAX_SEED)
    try:
        f = float(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be a whole number, got {seed!r}") from None
    if not math.isfinite(f) or f != int(f) or f > MAX_SEED:
        raise ValueError(f"seed must be a whole number in [0, {MAX_SEED}], got {seed!r}")
    return random.SystemRandom().randrange(MAX_SEED) if f < 0 else int(f)


@torch.no_grad()
def run_pipeline(
    pipe: Any, prompt: str, negative_prompt: str | None, seeds: list[int], steps: int, guidance: float
) -> list[Image.Image]:
    """One image per seed, batched; image i depends only on seeds[i] (one generator per image)."""
    device = getattr(pipe, "device", torch.device("cpu"))
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(device=gen_device).manual_seed(s) for s in seeds]
    out = pipe(
        prompt=[prompt] * len(seeds),
        negative_prompt=[negative_prompt] * len(seeds) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        output_type="pil",
    )
    return list(out.images)


def generate(
    cache: PipelineCache,
    folder: str | os.PathLike,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    seed: int = 0,
    num_images: int = 1,
    steps: int = 30,
    guidance: float = 7.5,
    delta_prime: float | None = None,
    side_by_side: bool = False,
    fallback_base: str | None = None,
) -> list[tuple[Image.Image, dict]]:
    """Images from the adapter in ``folder`` with its bound set to δ' (None: the trained δ).

    Returns (image, settings) pairs; with ``side_by_side`` each adapter image is preceded by the base
    model's image for the same seed (the adapter at δ' = 0, which is the base model exactly).
    """
    from ..diffusion import set_norm_bound

    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("enter a prompt")
    if not 1 <= int(num_images) <= 16:
        raise ValueError(f"number of images must be in [1, 16], got {num_images}")
    if not 1 <= int(steps) <= 500:
        raise ValueError(f"steps must be in [1, 500], got {steps}")
    guidance = float(guidance)
    if not math.isfinite(guidance) or guidance < 0:
        raise ValueError(f"guidance must be a number >= 0, got {guidance}")
    seeds = [(int(seed) + i) % (MAX_SEED + 1) for i in range(int(num_images))]
    with cache.lock:
        pipe, info = cache.with_adapter(folder, fallback_base)
        dp = info.delta if delta_prime is None else float(delta_prime)
        if not math.isfinite(dp) or dp < 0:
            raise ValueError(f"δ' must be a number >= 0, got {delta_prime}")
        base_settings = dict(
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            steps=int(steps),
            guidance=guidance,
            adapter=str(info.folder),
            delta=info.delta,
            base_model=info.base_model,
        )
        results: list[tuple[Image.Image, dict]] = []
        try:
            base_images = None
            if side_by_side:
                set_norm_bound(pipe, scale=0.0)
                base_images = run_pipeline(pipe, prompt, negative_prompt, seeds, int(steps), guidance)
            set_norm_bound(pipe, scale=dp / info.delta)
            images = run_pipeline(pipe, prompt, negative_prompt, seeds, int(steps), guidance)
        finally:
            set_norm_bound(pipe, scale=1.0)
        for i, (s, img) in enumerate(zip(seeds, images, strict=True)):
            if base_images is not None:
                results.append(
                    (base_images[i], {**base_settings, "seed": s, "delta_prime": 0.0, "variant": "base"})
                )
            results.append((img, {**base_settings, "seed": s, "delta_prime": dp, "variant": "adapter"}))
    return results


def caption(settings: dict) -> str:
    if settings.get("variant") == "base":
        return f"base · seed {settings['seed']}"
    return f"δ'={settings['delta_prime']:.3g} · seed {settings['seed']}"


def save_images(results: list[tuple[Image.Image, dict]], folder: str | os.PathLike) -> list[Path]:
    """PNG files with each image's settings as JSON in the "parameters" text chunk."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"  # unique: two redraws in one second
    paths = []
    for i, (img, settings) in enumerate(results):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps(settings))
        name = f"{stamp}-{i:02d}-{settings.get('variant', 'adapter')}-seed{settings.get('seed', 0)}.png"
        with atomic_path(folder / name) as tmp:
            img.save(tmp, pnginfo=info)
        paths.append(folder / name)
    return paths


def read_image_settings(path: str | os.PathLike) -> dict:
    """The settings stored by ``save_images`` in a PNG."""
    with Image.open(path) as img:
        text = img.info.get("parameters") if hasattr(img, "info") else None
    if not text:
        raise ValueError(f"{path} has no generation settings")
    return json.loads(text)


def _zip_files(files: list[Path], dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, arcname=f"{dest.stem}/{f.name}")
    return dest


def download_guide() -> str:
    """Markdown naming the tool each file of ``prepare_downloads`` is for, in the files' order."""
    from ..diffusion.export import DIFFUSERS_TOOLS, KOHYA_TOOLS

    return (
        "- `NAME-nblora.zip`: the native NB-LoRA adapter, for this package (`load_adapter`, the δ' slider)\n"
        f"- `{DIFFUSERS_FILE}`: diffusers LoRA, for **{DIFFUSERS_TOOLS}** "
        "(`pipe.load_lora_weights(folder)`); not for ComfyUI (it drops the attention keys)\n"
        f"- `NAME-kohya.safetensors`: kohya LoRA, for **{KOHYA_TOOLS}** "
        "(A1111 / Forge: `models/Lora`, ComfyUI: `models/loras`)"
    )


def prepare_downloads(
    cache: PipelineCache,
    folder: str | os.PathLike,
    dest_root: str | os.PathLike,
    fallback_base: str | None = None,
) -> list[Path]:
    """The adapter as three files to download, at its trained δ, in a new folder under ``dest_root``.

    [NAME-nblora.zip (nblora_config.json + native safetensors, for ``load_adapter``),
    pytorch_lora_weights.safetensors (diffusers LoRA, for stock ``pipe.load_lora_weights``),
    NAME-kohya.safetensors (kohya LoRA, for A1111 / ComfyUI / Forge)]; ``download_guide`` says so in
    the app. The LoRA files a training run wrote are reused; otherwise (checkpoints, other folders)
    they are exported from the loaded adapter.
    """
    from ..diffusion import export_diffusers_lora, export_kohya_lora, set_norm_bound

    info = read_adapter_info(folder)
    name = info.folder.name
    native = [info.folder / CONFIG_NAME] + [
        info.folder / c["file"] for c in info.config["components"].values()
    ]
    missing = [f.name for f in native if not f.is_file()]
    if missing:
        raise ValueError(f"adapter folder {info.folder} is incomplete: missing {', '.join(missing)}")
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with atomic_dir(dest) as tmp:
        files = [_zip_files(native, tmp / f"{name}-nblora.zip")]
        diffusers_file, kohya_file = tmp / DIFFUSERS_FILE, tmp / f"{name}-kohya.safetensors"
        saved_diffusers, saved_kohya = info.folder / DIFFUSERS_FILE, info.folder / KOHYA_FILE
        if not (saved_diffusers.is_file() and saved_kohya.is_file()):
            with cache.lock:
                pipe, _ = cache.with_adapter(info.folder, fallback_base)
                set_norm_bound(pipe, scale=1.0)
                if not saved_diffusers.is_file():
                    export_diffusers_lora(pipe, tmp)
                if not saved_kohya.is_file():
                    export_kohya_lora(pipe, kohya_file)
        if saved_diffusers.is_file():
            shutil.copyfile(saved_diffusers, diffusers_file)
        if saved_kohya.is_file():
            shutil.copyfile(saved_kohya, kohya_file)
        files += [diffusers_file, kohya_file]
        if dest.exists():
            raise ValueError(f"download folder already exists: {dest}")
    return [dest / f.name for f in files]
