"""Target presets for transformers models (data) and ``adapt_model``, which injects them with the core's
``inject_nblora``. The diffusion package has its own presets (``diffusion.targets``) for pipelines."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .._deprecated import deprecated_names
from ..core import NBLoRAConfig, inject_nblora

_LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")

# Module names matched on path boundaries. A preset may list several spellings of the same layer
# (transformers renamed ViT's `attention.attention.query` to `attention.q_proj` in v5): names that match
# nothing are skipped, and a preset that matches nothing at all is an error.
PRESETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_ATTN + _LLAMA_MLP,  # LLaMA / Mistral / Qwen2 / Gemma decoder blocks
    "llama-attn": _LLAMA_ATTN,
    "llama-qv": ("q_proj", "v_proj"),  # the LoRA paper's choice
    "vit": ("query", "value", "q_proj", "v_proj"),  # ViT attention query and value
    "vit-all": ("query", "key", "value", "output.dense", "intermediate.dense")  # transformers < 5
    + ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),  # transformers >= 5
}

# model.config.model_type -> preset used by preset="auto"
MODEL_TYPE_PRESETS: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama-attn",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
    "vit": "vit",
}


def preset_modules(preset: str | Sequence[str], model: nn.Module | None = None) -> tuple[str, ...]:
    """Module names for a preset name, "auto" (from ``model.config.model_type``) or explicit names."""
    if isinstance(preset, str):
        if preset == "auto":
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in MODEL_TYPE_PRESETS:
                raise ValueError(
                    f"no preset for model type {model_type!r}: pass preset= one of {sorted(PRESETS)} "
                    "or a list of module names"
                )
            return PRESETS[MODEL_TYPE_PRESETS[model_type]]
        if preset not in PRESETS:
            raise ValueError(
                f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}, 'auto' or module names"
            )
        return PRESETS[preset]
    names = tuple(preset)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"target modules must be a non-empty list of names, got {preset!r}")
    return names


def preset_config(
    rank: int = 8,
    p: float | str = math.inf,
    delta: float | None = None,
    gamma: float | None = None,
    preset: str | Sequence[str] = "auto",
    parameterization: str = "II",
    dropout: float = 0.0,
    model: nn.Module | None = None,
) -> NBLoRAConfig:
    """An ``NBLoRAConfig`` for a preset; give exactly one of δ (absolute) and γ (δ = γ·‖W_p‖_Sp per layer)."""
    return NBLoRAConfig(
        rank=rank,
        p=p,
        delta=delta,
        gamma=gamma,
        target_modules=preset_modules(preset, model),
        parameterization=parameterization,
        dropout=dropout,
    )


def adapt_model(
    model: nn.Module,
    config: NBLoRAConfig | None = None,
    **kwargs,
) -> list[str]:
    """Inject NB-LoRA into a transformers (or any torch) model; returns the replaced module names.

    Either a ready ``config`` or the keyword arguments of ``preset_config`` (``preset="auto"`` reads the
    model type). Only the adapter parameters (``nblora_*``) of the replaced layers are trainable; the
    rest of the model is frozen, as in PEFT.
    """
    if config is None:
        config = preset_config(model=model, **kwargs)
    elif kwargs:
        raise ValueError(f"pass either a config or preset_config keywords, not both (got {sorted(kwargs)})")
    replaced = inject_nblora(model, config)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1].startswith("nblora_"))
    return replaced


__getattr__ = deprecated_names(
    __name__,
    {
        "add_nblora": ("nblora_diffusion.transformer_models.adapt_model", lambda: adapt_model),
        "make_config": ("nblora_diffusion.transformer_models.preset_config", lambda: preset_config),
        "resolve_targets": ("nblora_diffusion.transformer_models.preset_modules", lambda: preset_modules),
    },
)
