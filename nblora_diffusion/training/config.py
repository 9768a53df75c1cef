"""TrainConfig: every option of train_dreambooth.py, validated, and the argument parser built from it.

The dataclass fields are exactly the command-line option names without the leading dashes, so a
config saved as JSON, a Python call and a command line all mean the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._deprecated import deprecated_names
from ..core.bounds import parse_p
from ..core.config import check_dropout, check_rank
from ..diffusion.targets import PRESET_NAMES
from ..formats import DEFAULT_BASE_MODEL, p_label

ADAPTERS = ("nblora", "lora", "dora", "pissa")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORT_TO = ("tensorboard", "none")
OPTIMIZERS = ("adamw", "adamw_fused", "adamw8bit", "prodigy")
SKELETON_NAMES = ("sd15", "sd21-base", "sd21-v", "sdxl-base")  # diffusion.single_file.SKELETONS


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    # -- model and data ------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = _opt(
        DEFAULT_BASE_MODEL, "hub id, local diffusers folder or single .safetensors file (SD1.x/2.x/SDXL)"
    )
    base_model_config: str | None = _opt(
        None,
        "configs of a single-file base model: a shipped skeleton (" + ", ".join(SKELETON_NAMES) + ") or a "
        "diffusers folder (default: inferred from the file's keys)",
    )
    allow_ckpt: bool = _opt(False, "accept a pickled .ckpt base model (torch's weights-only loader)")
    pretrained_vae_model_name_or_path: str | None = _opt(
        None, "another VAE: hub id, diffusers VAE folder or single .safetensors file (e.g. an fp16-safe VAE)"
    )
    instance_data_dir: str | None = _opt(None, "folder with the 3-30 subject photos (JPEG/PNG/WebP)")
    instance_prompt: str | None = _opt(None, 'prompt naming the subject, e.g. "a photo of sks dog"')
    output_dir: str = _opt("nblora-dreambooth-model", "where the adapter, checkpoints and logs go")
    overwrite_output_dir: bool = _opt(False, "replace the outputs of a previous run in --output_dir")
    resolution: int | None = _opt(None, "training resolution in px (default: the model's native size)")
    center_crop: bool = _opt(False, "center crop instead of a random crop")
    random_flip: bool = _opt(False, "random horizontal flips")
    seed: int | None = _opt(None, "seed for reproducible training (and exact resume)")
    # -- prior preservation ---------------------------------------------------------------------------
    with_prior_preservation: bool = _opt(False, "add the class-prior loss (DreamBooth)")
    class_data_dir: str | None = _opt(
        None, "folder of class images (generated with the base model if too few)"
    )
    class_prompt: str | None = _opt(None, 'prompt of the class, e.g. "a photo of dog"')
    num_class_images: int = _opt(100, "class images wanted in --class_data_dir")
    prior_loss_weight: float = _opt(1.0, "weight of the class-prior loss")
    sample_batch_size: int = _opt(4, "batch size when generating class images")
    class_inference_steps: int = _opt(50, "denoising steps per generated class image")
    output_preservation_weight: float = _opt(
        0.0,
        "weight of base-model output preservation: on --class_prompt the target is the frozen base "
        "model's prediction for the instance batch's noisy latents (ai-toolkit, OneTrainer); 0: off",
    )
    scale_weight_norms: float | None = _opt(
        None, "LoRA only: after each step rescale every pair so that ||BA||_F <= MAX (kohya sd-scripts)"
    )
    # -- optimisation ---------------------------------------------------------------------------------
    train_batch_size: int = _opt(1, "instance images per step and device (doubled with prior preservation)")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    max_train_steps: int = _opt(500, "optimizer steps")
    learning_rate: float = _opt(1e-4, "peak learning rate")
    scale_lr: bool = _opt(False, "multiply the learning rate by batch size x accumulation x processes")
    lr_scheduler: str = _opt("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "warm-up steps of the schedule")
    lr_num_cycles: int = _opt(1, "cycles of cosine_with_restarts")
    lr_power: float = _opt(1.0, "power of the polynomial schedule")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    optimizer: str = _opt(
        "adamw",
        "adamw (torch), adamw_fused (torch's fused kernel: faster, the same update up to rounding), "
        "adamw8bit (pip install bitsandbytes) or prodigy (pip install prodigyopt; use --learning_rate 1.0)",
        choices=OPTIMIZERS,
    )
    use_8bit_adam: bool = _opt(False, "alias of --optimizer adamw8bit")
    mixed_precision: str = _opt("no", "autocast precision; fp16 needs a GPU", choices=MIXED_PRECISION)
    allow_tf32: bool = _opt(False, "allow TF32 matmuls on Ampere+ GPUs")
    gradient_checkpointing: bool = _opt(False, "trade compute for memory in the UNet (and text encoder)")
    compile: bool = _opt(False, "torch.compile the UNet (and trained text encoders) for the training steps")
    snr_gamma: float | None = _opt(None, "Min-SNR loss weighting gamma (5.0 is the usual value)")
    noise_offset: float = _opt(0.0, "noise += offset * randn(B, C, 1, 1): brighter/darker images (0.05-0.1)")
    cache_latents: bool = _opt(
        False,
        "encode the images once (both flips with --random_flip; random crops of non-square photos need "
        "--center_crop), then move the VAE off the accelerator",
    )
    cache_text_embeddings: bool = _opt(
        False, "encode the prompts once, then move the frozen text encoder(s) off the accelerator"
    )
    train_text_encoder: bool = _opt(False, "also adapt the text encoder(s)")
    # -- adapter --------------------------------------------------------------------------------------
    adapter: str = _opt("nblora", "nblora, or a PEFT baseline on the same targets and rank", choices=ADAPTERS)
    rank: int = _opt(4, "adapter rank r")
    norm_p: str = _opt("inf", "Schatten p of the bound: 1 (nuclear), 2 (Frobenius), inf (spectral), any >= 1")
    norm_bound: float | None = _opt(None, "absolute bound delta on ||W||_Sp of every adapted layer")
    norm_bound_ratio: float | None = _opt(
        None, "relative bound gamma: delta = gamma * ||W_base||_Sp (default 0.1)"
    )
    parameterization: str = _opt("II", "NB-LoRA parameterization", choices=("I", "II"))
    target_preset: str = _opt(
        "attn", "adapted modules: attention projections or attention + MLP", choices=PRESET_NAMES
    )
    adapter_dropout: float = _opt(0.0, "dropout on the adapter input")
    text_encoder_rank: int | None = _opt(None, "text-encoder adapter rank (default: --rank)")
    text_encoder_norm_bound: float | None = _opt(
        None, "text-encoder delta (default: the UNet's bound option)"
    )
    bernoulli_p: float | None = _opt(
        None,
        "Bernoulli-LoRA: each step update only the input factor with "
        "probability q, else only the output factor",
    )
    # -- checkpoints, validation, logging ------------------------------------------------------------
    checkpointing_steps: int = _opt(500, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: int | None = _opt(None, "keep at most N checkpoints")
    resume_from_checkpoint: str | None = _opt(None, '"latest" or a checkpoint folder')
    validation_prompt: str | None = _opt(None, "prompt for validation images")
    validation_steps: int = _opt(100, "generate validation images every N steps")
    num_validation_images: int = _opt(4, "validation images per run")
    validation_inference_steps: int = _opt(25, "denoising steps per validation image")
    validation_metrics: str | None = _opt(
        None,
        "comma-separated metrics of the validation images vs the instance photos at each validation: "
        "dino, clip_i, clip_t, lpips_div, lpips_ref, drift (validation_metrics.csv, TensorBoard val/*)",
    )
    validation_metric_config: str | None = _opt(
        None, "JSON file of metric settings (MetricConfig fields: dino_model, clip_model, lpips_model, ...)"
    )
    validation_metrics_offload: bool = _opt(False, "move the metric models to the CPU between validations")
    best_metric: str | None = _opt(None, "best_checkpoint.json names the validation step best in this metric")
    best_constraint: str | None = _opt(
        None, 'only steps meeting this count for --best_metric, e.g. "clip_t>=base-0.01" (base: step 0)'
    )
    report_to: str = _opt("tensorboard", "experiment tracker", choices=REPORT_TO)
    logging_dir: str = _opt("logs", "TensorBoard folder, relative to --output_dir")
    norm_logging_steps: int = _opt(1, "log per-layer norm ratios every N steps")
    export_kohya: bool = _opt(False, "also write a kohya-format LoRA file")
    demo: bool = _opt(False, "offline demo: the shipped micro SD and a bundled micro-world subject")
    estimate_memory: bool = _opt(
        False, "print the expected peak GPU memory of these settings (no GPU, no weights) and exit"
    )
    local_rank: int = _opt(-1, "set by torch.distributed launchers")

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        try:
            p = parse_p(self.norm_p)
        except ValueError as e:
            raise ValueError(f"--norm_p: {e}") from None
        object.__setattr__(self, "norm_p", p_label(p))
        positive_ints = (
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "checkpointing_steps",
            "validation_steps",
            "num_validation_images",
            "sample_batch_size",
            "class_inference_steps",
            "validation_inference_steps",
            "norm_logging_steps",
            "lr_num_cycles",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f"--{name} must be an integer >= 1, got {value!r}")
        for name in ("checkpoints_total_limit", "resolution"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                fail(f"--{name} must be an integer >= 1, got {value!r}")
        # every supported model downsamples by 8 or more; setup.check_resolution checks the model's own factor
        if self.resolution is not None and self.resolution % 8:
            fail(f"--resolution must be a multiple of 8, got {self.resolution}")
        check_rank(self.rank, "--rank")  # the layer-level values: the core's checks, with the option's name
        if self.text_encoder_rank is not None:
            check_rank(self.text_encoder_rank, "--text_encoder_rank")
        check_dropout(self.adapter_dropout, "--adapter_dropout")
        for name in ("lr_warmup_steps", "num_class_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(f"--{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("learning_rate", "adam_epsilon", "prior_loss_weight", "lr_power"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                fail(f"--{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("adam_weight_decay", "max_grad_norm"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                fail(f"--{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not _finite(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                fail(f"--{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("norm_bound", "norm_bound_ratio", "text_encoder_norm_bound", "snr_gamma"):
            value = getattr(self, name)
            if value is not None and (not _finite(value) or value <= 0):
                fail(f"--{name} must be a finite number > 0, got {value!r}")
        if not _finite(self.noise_offset) or self.noise_offset < 0:
            fail(f"--noise_offset must be a finite number >= 0, got {self.noise_offset!r}")
        if self.bernoulli_p is not None and (not _finite(self.bernoulli_p) or not 0 < self.bernoulli_p < 1):
            fail(f"--bernoulli_p must be in (0, 1), got {self.bernoulli_p!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                fail(f"--{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        if self.norm_bound is not None and self.norm_bound_ratio is not None:
            fail("give at most one of --norm_bound and --norm_bound_ratio")
        if self.with_prior_preservation:
            if not self.class_data_dir:
                fail("--with_prior_preservation needs --class_data_dir")
            if not self.class_prompt:
                fail("--with_prior_preservation needs --class_prompt")
        if not _finite(self.output_preservation_weight) or self.output_preservation_weight < 0:
            value = self.output_preservation_weight
            fail(f"--output_preservation_weight must be a finite number >= 0, got {value!r}")
        if self.output_preservation_weight and not self.class_prompt:
            fail("--output_preservation_weight needs --class_prompt")
        if self.scale_weight_norms is not None:
            if not _finite(self.scale_weight_norms) or self.scale_weight_norms <= 0:
                fail(f"--scale_weight_norms must be a finite number > 0, got {self.scale_weight_norms!r}")
            if self.adapter != "lora":
                fail(f"--scale_weight_norms applies to --adapter lora, not {self.adapter}")
        if self.text_encoder_rank is not None and not self.train_text_encoder:
            fail("--text_encoder_rank needs --train_text_encoder")
        if self.text_encoder_norm_bound is not None and not self.train_text_encoder:
            fail("--text_encoder_norm_bound needs --train_text_encoder")
        if self.use_8bit_adam:  # the old flag: an alias that must not contradict --optimizer
            if self.optimizer not in ("adamw", "adamw8bit"):
                fail(f"--use_8bit_adam contradicts --optimizer {self.optimizer}")
            object.__setattr__(self, "optimizer", "adamw8bit")
        if self.cache_text_embeddings and self.train_text_encoder:
            fail("--cache_text_embeddings needs frozen text encoders: drop it or --train_text_encoder")
        single_file = str(self.pretrained_model_name_or_path).lower().endswith((".safetensors", ".ckpt"))
        if self.base_model_config is not None and not (single_file or self.estimate_memory):
            fail(
                "--base_model_config applies to a single-file --pretrained_model_name_or_path "
                "(or to --estimate_memory)"
            )
        if self.adapter != "nblora" and self.parameterization != "II":
            fail(f"--parameterization applies to --adapter nblora, not {self.adapter}")
        for name in ("instance_prompt", "class_prompt", "validation_prompt"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                fail(f"--{name} must not be empty")
        from .validation_metrics import check_options

        check_options(self)

    # -- derived values ------------------------------------------------------------------------------
    @property
    def p(self) -> float:
        return parse_p(self.norm_p)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training options: {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def _finite(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


# -- command line ------------------------------------------------------------------------------------
_TYPES = {"int": int, "float": float, "str": str}


def _arg_type(f: dataclasses.Field) -> type:
    # annotations are strings under `from __future__ import annotations`: "int | None" -> int
    base = str(f.type).replace(" ", "").split("|")[0]
    return _TYPES.get(base, str)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line for the caller to print, not the whole usage text
        raise ValueError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one option per TrainConfig field (same name, same default); bad options
    raise ValueError instead of exiting."""
    parser = _Parser(
        prog="train_dreambooth.py",
        description="DreamBooth personalisation of Stable Diffusion (SD1.x/2.x/SDXL) with NB-LoRA "
        "(norm-bounded LoRA) or a PEFT baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(TrainConfig):
        name = "--" + f.name
        if f.type == "bool":
            parser.add_argument(name, action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(
                name,
                type=_arg_type(f),
                default=f.default,
                help=f.metadata["help"],
                choices=f.metadata.get("choices"),
            )
    return parser


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**vars(ns))


def demo_overrides(model_path: str | Path, instance_dir: Path, output_dir: str | Path) -> dict[str, Any]:
    """Defaults of ``--demo``: the micro SD and a bundled micro-world subject (a blue-and-white striped
    circle: "sks circle", class "circle"), at the micro world's 32 px: the settings of
    tests/test_microworld_learning.py (about a minute on one CPU core)."""
    return {
        "pretrained_model_name_or_path": str(model_path),
        "instance_data_dir": str(instance_dir),
        "instance_prompt": "a photo of sks circle",
        "class_prompt": "a photo of a circle",  # for --with_prior_preservation (slower to learn the subject)
        "class_data_dir": str(Path(output_dir) / "class_images"),
        "prior_loss_weight": 0.3,
        "num_class_images": 20,
        "class_inference_steps": 20,
        "sample_batch_size": 20,
        "validation_prompt": "a photo of sks circle on a green background",
        "resolution": 32,
        "train_batch_size": 5,  # the five photos in every step
        "max_train_steps": 300,
        "learning_rate": 5e-3,
        "norm_p": "inf",
        "norm_bound": 4.0,
        "rank": 8,
        "checkpointing_steps": 100,
        "validation_steps": 300,
        "num_validation_images": 4,
        "validation_inference_steps": 20,
        "cache_latents": True,  # the same numbers as encoding every step, ~10% faster
        "cache_text_embeddings": True,
        "seed": 0,
    }


__getattr__ = deprecated_names(
    __name__,
    {
        "TARGET_PRESETS": ("nblora_diffusion.diffusion.targets.PRESET_NAMES", lambda: PRESET_NAMES),
        "DEFAULT_MODEL": ("nblora_diffusion.formats.DEFAULT_BASE_MODEL", lambda: DEFAULT_BASE_MODEL),
    },
)
