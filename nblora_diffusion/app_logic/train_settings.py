"""From the Train tab's values to a ``training.TrainConfig``, with one-line errors for bad input (the
page's own names and limits here; the rest is ``TrainConfig``'s validation)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats import p_label
from .uploads import p_value

_TOKEN = re.compile(r"^[A-Za-z0-9_<>\-]+$")


def _positive_int(value: Any, name: str, lo: int = 1, hi: int | None = None) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f) or f < lo or (hi is not None and f > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be a whole number {rng}, got {value!r}")
    return int(f)


def _positive_float(value: Any, name: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(f) or f <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return f


def prompts_for(token: str, class_noun: str) -> tuple[str, str]:
    """(instance prompt, class prompt) in the DreamBooth form 'a photo of sks dog' / 'a photo of dog'."""
    token, class_noun = (token or "").strip(), (class_noun or "").strip()
    if not token or not _TOKEN.match(token):
        raise ValueError(f"the token must be one word of letters, digits, '_', '-', '<', '>', got {token!r}")
    if not class_noun or len(class_noun) > 60:
        raise ValueError(f"the class noun must be a short noun such as 'dog', got {class_noun!r}")
    if token.lower() == class_noun.lower():
        raise ValueError(f"the token must differ from the class noun, both are {token!r}")
    return f"a photo of {token} {class_noun}", f"a photo of {class_noun}"


def make_train_config(
    *,
    base_model: str,
    instance_data_dir: str | Path,
    output_dir: str | Path,
    token: str,
    class_noun: str,
    p: str | float,
    delta: float,
    rank: int,
    max_train_steps: int,
    learning_rate: float,
    seed: int,
    resolution: int,
    with_prior_preservation: bool = False,
    class_data_dir: str | Path | None = None,
    num_class_images: int = 100,
    validation_prompt: str | None = None,
    validation_steps: int | None = None,
    num_validation_images: int = 2,
    checkpointing_steps: int | None = None,
    **extra: Any,
) -> Any:
    """A ``training.TrainConfig`` from the Train tab's values, with one-line ValueErrors for bad input.

    Here the tab's values are read as numbers, under the page's names and limits (steps up to 100 000,
    rank up to 1024, ...); everything else (e.g. resolution a multiple of 8, prior preservation's class
    folder) is ``TrainConfig``'s own validation.
    """
    from ..training import TrainConfig

    instance_prompt, class_prompt = prompts_for(token, class_noun)
    pv = p_value(p)
    steps = _positive_int(max_train_steps, "steps", 1, 100_000)
    resolution = _positive_int(resolution, "resolution", 32, 2048)
    validation_steps = _positive_int(validation_steps or max(steps // 4, 1), "validation steps")
    checkpointing_steps = _positive_int(
        checkpointing_steps or max(min(250, steps // 2), 1), "checkpointing steps"
    )
    values = dict(
        pretrained_model_name_or_path=str(base_model),
        instance_data_dir=str(instance_data_dir),
        instance_prompt=instance_prompt,
        output_dir=str(output_dir),
        resolution=resolution,
        max_train_steps=steps,
        learning_rate=_positive_float(learning_rate, "learning rate"),
        seed=_positive_int(seed, "seed", 0, 2**32 - 1),
        adapter="nblora",
        rank=_positive_int(rank, "rank", 1, 1024),
        norm_p=p_label(pv),
        norm_bound=_positive_float(delta, "δ"),
        with_prior_preservation=bool(with_prior_preservation),
        class_prompt=class_prompt,
        validation_prompt=validation_prompt or instance_prompt,
        validation_steps=validation_steps,
        num_validation_images=_positive_int(num_validation_images, "validation images", 1, 16),
        checkpointing_steps=checkpointing_steps,
        **extra,
    )
    if with_prior_preservation:
        values.update(
            class_data_dir=str(class_data_dir) if class_data_dir else None,  # None: TrainConfig says so
            num_class_images=_positive_int(num_class_images, "class images"),
        )
    return TrainConfig(**values)


def native_resolution(base_model: str | None) -> int:
    """Image size the base model was trained at: from a local pipeline folder's configs, from the shipped
    configs of the architecture a single-file checkpoint's keys show (its header, plus one bias for
    SD2.x's ε/v), else a guess from the name (1024 for "xl", else 512)."""
    folder = Path(base_model).expanduser() if base_model else None
    if folder is not None and folder.is_file():
        from ..diffusion import single_file

        try:
            ckpt = single_file.read_checkpoint(folder)  # .safetensors: the header only
            arch = single_file.checkpoint_architecture(ckpt)
            prediction = single_file.prediction_type(ckpt, arch)
            folder = single_file.CONFIGS / single_file.skeleton_for(arch, prediction)
        except ValueError:  # a .ckpt (not unpickled here) or an unknown layout: guess from the name
            folder = None
    if folder is not None and folder.is_dir():
        try:
            unet = json.loads((folder / "unet" / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
            sample = unet["sample_size"]
            sample = sample[0] if isinstance(sample, (list, tuple)) else sample
            return int(sample) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, KeyError, TypeError, ValueError):
            pass
    return 1024 if base_model and "xl" in base_model.lower() else 512


def mixed_precision() -> str:
    """bf16 autocast where the GPU has it, fp16 on older GPUs, none on CPU."""
    import torch

    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resumable_config(folder: str | Path) -> Any:
    """The training of a stopped run folder, set to continue from its latest checkpoint.

    ValueError (one line) if the folder is not a training run, has no checkpoint, or already finished.
    """
    from ..diffusion import CONFIG_NAME
    from ..training import TrainConfig
    from ..training.checkpoint import checkpoints
    from ..training.outputs import CONFIG_FILE

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{folder.name or folder} is not a training run ({CONFIG_FILE} is missing)")
    try:
        config = TrainConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{folder.name}: {CONFIG_FILE} cannot be read ({str(e).splitlines()[0]})") from None
    saved = checkpoints(folder)
    if not saved:
        raise ValueError(f"{folder.name} has no checkpoint to resume from")
    adapter_config = folder / CONFIG_NAME  # the adapter written when the run ended, stopped or not
    step = json.loads(adapter_config.read_text()).get("global_step") if adapter_config.is_file() else None
    step = max(saved[-1][0], step or 0)
    if step >= config.max_train_steps:
        raise ValueError(f"{folder.name} already finished ({step} of {config.max_train_steps} steps)")
    return config.replace(resume_from_checkpoint="latest")


def resumable_runs(root: str | Path) -> list[Path]:
    """Run folders under ``root`` that stopped before their last step and can resume, newest first."""
    root = Path(root)
    runs = []
    for folder in root.iterdir() if root.is_dir() else []:
        try:
            resumable_config(folder)
        except (ValueError, OSError):  # not a run, nothing saved, finished, unreadable
            continue
        runs.append(folder)
    return sorted(runs, key=lambda d: d.stat().st_mtime, reverse=True)


@dataclass(frozen=True)
class FormDefaults:
    """The values the Train and Generate tabs open with (a base model may need others)."""

    class_noun: str = "dog"
    p: str = "2"  # one of uploads.P_CHOICES
    rank: int = 4
    delta: float | None = None  # None: uploads.default_delta(p, rank)
    steps: int = 400
    learning_rate: float = 1e-4
    prior: bool = False
    class_images: int = 100
    denoise_steps: int = 30  # validation and generation
    guidance: float = 7.5


# the shipped micro SD (app --tiny): the rank, δ and rate of tests/test_microworld_learning.py, with more
# steps at the page's batch of one photo (the tests put all five in every step)
MICRO_DEFAULTS = FormDefaults(
    class_noun="circle", p="∞", rank=8, delta=4.0, steps=500, learning_rate=5e-3, class_images=20,
    denoise_steps=20, guidance=5.0,
)  # fmt: skip
