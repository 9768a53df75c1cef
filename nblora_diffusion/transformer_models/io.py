"""Adapter folders for transformers models: the native format (``save_model_adapter``: weights +
``nblora_adapter_config.json``) and the PEFT LoRA format (``export_peft``)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from torch import nn

from .._deprecated import deprecated_names
from ..core import (
    atomic_save_safetensors,
    export_lora_state_dict,
    injected_configs,
    load_nblora,
    nblora_layers,
    save_nblora,
    unload_nblora,
)
from ..fileio import atomic_write_json as _atomic_write_json
from ..formats import (
    LEGACY_MODEL_ADAPTER_CONFIG_FILE,
    MODEL_ADAPTER_CONFIG_FILE,
    MODEL_ADAPTER_FORMAT,
    MODEL_ADAPTER_WEIGHTS_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
)

WEIGHTS_NAME = MODEL_ADAPTER_WEIGHTS_FILE
CONFIG_NAME = MODEL_ADAPTER_CONFIG_FILE
PEFT_WEIGHTS_NAME = PEFT_WEIGHTS_FILE
PEFT_CONFIG_NAME = PEFT_CONFIG_FILE
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for the wrapped model


def _write_json(data: dict, path: Path) -> None:
    _atomic_write_json(path, data, indent=2, sort_keys=True)


def _old_write_json(data: dict, path: str | os.PathLike) -> None:  # the old atomic_write_json(data, path)
    _write_json(data, Path(path))


def _base_model_name(model: nn.Module, base_model: str | None) -> str | None:
    if base_model is not None:
        return str(base_model)
    return getattr(model, "name_or_path", None) or None


def _require_adapters(model: nn.Module, what: str) -> list:
    layers = list(nblora_layers(model))
    if not layers:
        raise ValueError(f"model has no NB-LoRA adapters to {what}: call adapt_model first")
    return layers


def save_model_adapter(
    model: nn.Module, folder: str | os.PathLike, base_model: str | None = None, **extra
) -> Path:
    """Write ``folder/nblora_adapter.safetensors`` and ``folder/nblora_adapter_config.json``; returns folder.

    The config records the base model, the injected configs (preset names, p, δ or γ, rank,
    parameterization) and any ``extra`` JSON-serialisable fields. Weights are written first, each file
    atomically, so a folder with a config always has matching weights.
    """
    layers = _require_adapters(model, "save")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"adapter folder {folder} exists and is not a directory")
    name = _base_model_name(model, base_model)
    save_nblora(model, folder / WEIGHTS_NAME, base_model=name or "")
    config = {
        "format": MODEL_ADAPTER_FORMAT,
        "base_model_name_or_path": name,
        "configs": injected_configs(model),
        "modules": [n for n, _ in layers],
        **extra,
    }
    _write_json(config, folder / CONFIG_NAME)
    return folder


def load_model_adapter(model: nn.Module, folder: str | os.PathLike) -> dict:
    """Load an adapter folder written by ``save_model_adapter`` (injecting first if the model has no
    adapters). Folders from before the config file's rename (``nblora_config.json``) still load.

    Returns the folder's config. ValueError for a missing folder, a missing or corrupt file, or
    weights that do not fit the model.
    """
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file() and (folder / LEGACY_MODEL_ADAPTER_CONFIG_FILE).is_file():
        config_path = folder / LEGACY_MODEL_ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder} is not an NB-LoRA adapter folder: {CONFIG_NAME} not found")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read {config_path}: {e}") from None
    load_nblora(model, folder / WEIGHTS_NAME)
    return config


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every update into its base weight and put the plain nn.Linear layers back."""
    _require_adapters(model, "merge")
    return unload_nblora(model, merge=True)


def peft_lora_config_dict(
    model: nn.Module, base_model: str | None = None, task_type: str | None = None
) -> dict:
    """The ``adapter_config.json`` content for the model's adapters, built by ``peft.LoraConfig``.

    lora_alpha = r so PEFT's scaling is exactly 1; target_modules are the full module names (PEFT
    matches a name exactly or on a path boundary, the same rule the injection used). Layers whose
    rank differs from the most common one go in rank_pattern / alpha_pattern.
    """
    from peft import LoraConfig

    layers = _require_adapters(model, "export")
    ranks = {name: layer.rank for name, layer in layers}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        base_model_name_or_path=_base_model_name(model, base_model),
        task_type=task_type,
        inference_mode=True,
    )
    return {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}


def export_peft(
    model: nn.Module, folder: str | os.PathLike, base_model: str | None = None, task_type: str | None = None
) -> Path:
    """Write the adapters as a plain PEFT LoRA folder; returns the folder.

    ``peft.PeftModel.from_pretrained(base, folder)`` then computes the same outputs as the NB-LoRA
    model: lora_B·lora_A equals the NB-LoRA update exactly (runtime scale included) and alpha = r.
    """
    _require_adapters(model, "export")
    config = peft_lora_config_dict(model, base_model, task_type)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"export folder {folder} exists and is not a directory")
    tensors = export_lora_state_dict(model, prefix=PEFT_PREFIX)
    atomic_save_safetensors(tensors, folder / PEFT_WEIGHTS_NAME, {"format": "pt"})
    _write_json(config, folder / PEFT_CONFIG_NAME)
    return folder


__getattr__ = deprecated_names(
    __name__,
    {
        "save_adapter": (
            "nblora_diffusion.transformer_models.save_model_adapter",
            lambda: save_model_adapter,
        ),
        "load_adapter": (
            "nblora_diffusion.transformer_models.load_model_adapter",
            lambda: load_model_adapter,
        ),
        "atomic_write_json": (
            "nblora_diffusion.fileio.atomic_write_json(path, data)",
            lambda: _old_write_json,
        ),
    },
)
