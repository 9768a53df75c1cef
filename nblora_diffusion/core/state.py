"""Adapter state dicts, safetensors files and plain-LoRA export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..fileio import atomic_path
from ..formats import format_p
from .config import NBLoRAConfig
from .inject import inject_nblora, injected_configs, nblora_layers

FORMAT = "nblora"
FORMAT_VERSION = "1"


def _is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1].startswith("nblora_")


def nblora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (all named ``nblora_*``), keyed by their path in the model."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter_key(k)}


def load_nblora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an injected model; keys and shapes must match exactly."""
    own = nblora_state_dict(model)
    if not own:
        raise ValueError("model has no NB-LoRA adapters: inject before loading a state dict")
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"adapter state dict does not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, value in state_dict.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} in the file, {tuple(own[key].shape)} in the model"
            )
        if not value.dtype.is_floating_point:
            raise ValueError(f"{key}: expected a floating-point tensor, got {value.dtype}")
    if any(layer.merged for _, layer in nblora_layers(model)):
        raise ValueError("unmerge the adapters before loading new weights")
    with torch.no_grad():
        for key, value in state_dict.items():
            own[key].copy_(value.to(own[key].device))
    for _, layer in nblora_layers(model):
        layer.forget_factors()


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict
) -> None:
    """safetensors file written to a temporary name and renamed: never half-written."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_nblora(model: nn.Module, path: str | os.PathLike, **metadata) -> None:
    """Save the adapter tensors as safetensors with the configs (p, δ, rank, targets...) as metadata."""
    tensors = nblora_state_dict(model)
    if not tensors:
        raise ValueError("model has no NB-LoRA adapters to save")
    layers = {
        name: {
            "rank": l.rank,
            "p": format_p(l.p),
            "delta": l.delta,
            "parameterization": l.parameterization,
            "in_features": l.in_features,
            "out_features": l.out_features,
        }
        for name, l in nblora_layers(model)
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "configs": json.dumps(injected_configs(model)),
        "layers": json.dumps(layers),
    }
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    atomic_save_safetensors(tensors, path, meta)


def read_safetensors(path: str | os.PathLike, what: str = "safetensors") -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a safetensors file; one-line ValueError for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"cannot read {path}: not a valid safetensors file ({e})") from None
    return tensors, meta


def read_nblora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an NB-LoRA safetensors file, with clear errors for bad files."""
    tensors, meta = read_safetensors(path, "NB-LoRA")
    path = Path(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an NB-LoRA adapter file (metadata format={meta.get('format')!r})")
    return tensors, meta


def load_nblora(model: nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Load an adapter file into ``model``, injecting the saved configs first if it has no adapters.

    Returns the file's metadata.
    """
    tensors, meta = read_nblora_file(path)
    if not any(True for _ in nblora_layers(model)):
        for cfg in json.loads(meta.get("configs", "[]")):
            inject_nblora(model, NBLoRAConfig.from_dict(cfg))
    load_nblora_state_dict(model, tensors)
    return meta


@torch.no_grad()
def export_lora_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Plain LoRA weights with PEFT-style keys: W = lora_B @ lora_A exactly (alpha = rank).

    lora_A = P_inᵀ (r, in) and lora_B = P_out·diag(g·scale) (out, r); for parameterization II that is
    lora_A = A and lora_B = 2BᵀS.
    """
    out = {}
    for name, layer in nblora_layers(model):
        A, B = layer.factors()
        out[f"{prefix}{name}.lora_A.weight"] = A.contiguous().clone()
        out[f"{prefix}{name}.lora_B.weight"] = B.contiguous().clone()
    if not out:
        raise ValueError("model has no NB-LoRA adapters to export")
    return out
