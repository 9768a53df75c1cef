"""NB-LoRA on Stable Diffusion pipelines: add adapters, save and load adapter folders."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .._deprecated import deprecated_names
from ..core import (
    NBLoRAConfig,
    NBLoRALinear,
    inject_nblora,
    injected_configs,
    load_nblora,
    load_nblora_state_dict,
    nblora_layers,
    nblora_state_dict,
    read_nblora_file,
    save_nblora,
    unload_nblora,
)
from ..core.inject import matches
from ..fileio import atomic_write_text
from ..formats import ADAPTER_CONFIG_FILE, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, adapter_weights_file
from .pipeline import TEXT_ENCODERS, architecture, components
from .single_file import file_base_model_id, same_base_model

logger = logging.getLogger(__name__)

CONFIG_NAME = ADAPTER_CONFIG_FILE  # the name users import from nblora_diffusion.diffusion
_RESERVED = frozenset(
    ("format", "format_version", "base_model", "base_model_id", "architecture", "token", "rank", "p", "delta",
     "gamma", "targets", "parameterization", "components")
)  # fmt: skip


def linear_targets(model: nn.Module, config: NBLoRAConfig, component: str = "model") -> NBLoRAConfig:
    """The config with its targets restricted to nn.Linear modules of ``model``.

    A target name whose matches are all non-Linear (SD1.x's Conv2d proj_in/proj_out under the wide
    preset) is skipped; one with mixed matches is replaced by the full names of its Linear matches.
    """
    kept: list[str] = []
    for target in config.target_modules:
        found = [(n, m) for n, m in model.named_modules() if n and matches(n, (target,))]
        linear = [n for n, m in found if isinstance(m, (nn.Linear, NBLoRALinear))]
        if found and not linear:
            logger.info(
                "%s: skipping target %r (matches %s, not nn.Linear)",
                component,
                target,
                type(found[0][1]).__name__,
            )
        elif len(linear) < len(found):
            kept += linear
        elif found:
            kept.append(target)
    if not kept:
        raise ValueError(
            f"no nn.Linear module of the {component} matches target_modules {list(config.target_modules)}"
        )
    return dataclasses.replace(config, target_modules=tuple(kept))


def add_nblora(
    pipe, unet: NBLoRAConfig | None, text_encoder: NBLoRAConfig | None = None
) -> dict[str, list[str]]:
    """Inject NB-LoRA into the UNet and/or the text encoder(s) (SDXL: the text_encoder config is used
    for both encoders). Returns component -> replaced module names.

    Attention processors (SDPA, xformers, ...) are untouched: only the Linear projections are wrapped.
    If any component fails, the components injected by this call are restored before raising.
    """
    if unet is None and text_encoder is None:
        raise ValueError("give an NB-LoRA config for the unet and/or the text_encoder")
    for name, cfg in (("unet", unet), ("text_encoder", text_encoder)):
        if cfg is not None and not isinstance(cfg, NBLoRAConfig):
            raise ValueError(f"{name} config must be an NBLoRAConfig, got {type(cfg).__name__}")
    parts = components(pipe)
    plan = [("unet", unet)] if unet is not None else []
    if text_encoder is not None:
        plan += [(name, text_encoder) for name in TEXT_ENCODERS if name in parts]
    resolved = [(name, linear_targets(parts[name], cfg, name)) for name, cfg in plan]  # validates all first
    fresh = {name for name, _ in plan if not any(True for _ in nblora_layers(parts[name]))}
    grad_flags = [(t, t.requires_grad) for name in fresh for t in parts[name].parameters()]
    replaced: dict[str, list[str]] = {}
    try:
        # parameters made under torch.inference_mode would be inference tensors: no version counter for
        # the core's factor cache, no training
        with torch.inference_mode(False):
            for name, cfg in resolved:
                replaced[name] = inject_nblora(parts[name], cfg)  # all-or-nothing per component
    except ValueError:
        for name in replaced:
            if name in fresh:  # roll back the components this call injected
                unload_nblora(parts[name], merge=False)
        for t, flag in grad_flags:  # injection froze the wrapped base weights
            t.requires_grad_(flag)
        raise
    return replaced


def adapted_components(pipe) -> dict[str, nn.Module]:
    """Components of the pipeline that carry NB-LoRA adapters."""
    return {n: m for n, m in components(pipe).items() if any(True for _ in nblora_layers(m))}


def _require_adapters(pipe) -> dict[str, nn.Module]:
    parts = adapted_components(pipe)
    if not parts:
        raise ValueError("the pipeline has no NB-LoRA adapters (add_nblora or load_adapter first)")
    return parts


def _summary(model: nn.Module) -> dict:
    configs = injected_configs(model)
    layers = [layer for _, layer in nblora_layers(model)]
    deltas = [layer.delta for layer in layers]
    return {
        "file": None,
        "configs": configs,
        "num_layers": len(layers),
        "num_parameters": sum(t.numel() for layer in layers for t in layer.adapter_tensors().values()),
        "delta_range": [min(deltas), max(deltas)],
    }


def save_adapter(pipe, folder: str | os.PathLike, base_model: str, token: str | None = None, **extra) -> Path:
    """Write an adapter folder: one native safetensors file per adapted component and nblora_config.json.

    The JSON records the base model (for a checkpoint file also ``base_model_id``: its name and content
    hash), the architecture, p, δ (or γ), rank, targets, parameterization and the instance token, plus any
    JSON-serialisable ``extra`` keys. Files are written atomically and the JSON last, so an interrupted
    save never leaves a folder that loads.
    """
    parts = _require_adapters(pipe)
    clash = sorted(set(extra) & _RESERVED)
    if clash:
        raise ValueError(f"extra keys {clash} are reserved adapter config keys")
    info: dict = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "base_model": str(base_model),
        "base_model_id": file_base_model_id(base_model),
        "architecture": architecture(pipe),
        "token": token,
        "components": {},
    }
    main_cfg = injected_configs(parts.get("unet") or next(iter(parts.values())))[0]
    info.update({k: main_cfg[k] for k in ("rank", "p", "delta", "gamma", "parameterization")})
    info["targets"] = main_cfg["target_modules"]
    info.update(extra)
    try:
        text = json.dumps(info, indent=2)
    except TypeError as e:
        raise ValueError(f"extra adapter config values must be JSON-serialisable: {e}") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).unlink(missing_ok=True)  # an overwritten folder must not load half-updated
    for name, model in parts.items():
        summary = _summary(model)
        summary["file"] = adapter_weights_file(name)
        info["components"][name] = summary
        save_nblora(model, folder / summary["file"], component=name, base_model=str(base_model))
    info["components"] = info.pop("components")  # the summary keys first, the per-component details last
    text = json.dumps(info, indent=2)
    atomic_write_text(folder / CONFIG_NAME, text + "\n")
    for stale in folder.glob("nblora_*.safetensors"):  # files of components no longer adapted
        if stale.name not in {c["file"] for c in info["components"].values()}:
            stale.unlink()
    return folder


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """The nblora_config.json of an adapter folder, checked for the keys loading needs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"adapter folder not found: {folder}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{folder} is not an NB-LoRA adapter folder: {CONFIG_NAME} is missing")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an NB-LoRA adapter config (format={fmt!r})")
    if not isinstance(info.get("components"), dict) or not info["components"]:
        raise ValueError(f"{path} lists no adapted components")
    return info


def load_adapter(pipe, folder: str | os.PathLike) -> dict:
    """Load an adapter folder onto a pipeline, injecting the saved configs where it has no adapters.

    Checks the architecture, the base checkpoint (when the adapter and the pipeline both come from
    checkpoint files, their content hashes must agree), every file and every shape before anything is
    kept: on any error the pipeline is left as it was. Returns the adapter config (nblora_config.json).
    """
    folder = Path(folder)
    info = read_adapter_config(folder)
    arch = architecture(pipe)
    if info.get("architecture") != arch:
        raise ValueError(
            f"adapter {folder} was trained for {info.get('architecture')}, the pipeline is {arch} "
            f"(base model of the adapter: {info.get('base_model')})"
        )
    trained_on, loaded = info.get("base_model_id"), file_base_model_id(getattr(pipe, "name_or_path", None))
    if trained_on and loaded and not same_base_model(trained_on, loaded):
        raise ValueError(f"adapter {folder} was trained on checkpoint {trained_on}, the pipeline is {loaded}")
    parts = components(pipe)
    for name, comp in info["components"].items():
        if name not in parts:
            raise ValueError(f"adapter has weights for {name!r}, which the pipeline lacks")
        read_nblora_file(folder / comp["file"])  # existence and integrity, before touching the model
    fresh = {name for name in info["components"] if not any(True for _ in nblora_layers(parts[name]))}
    snapshot = {
        name: {k: v.clone() for k, v in nblora_state_dict(parts[name]).items()}
        for name in info["components"]
        if name not in fresh
    }
    done: list[str] = []
    try:
        # injection draws random inits (then overwritten): keep the caller's RNG stream; no inference tensors
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
            for name, comp in info["components"].items():
                done.append(name)
                load_nblora(parts[name], folder / comp["file"])
    except ValueError as e:
        for i, name in enumerate(done):  # leave the pipeline as it was
            if name in fresh:
                if any(True for _ in nblora_layers(parts[name])):
                    unload_nblora(parts[name], merge=False)
            elif i < len(done) - 1:  # the core checks a whole state dict before copying any of it
                load_nblora_state_dict(parts[name], snapshot[name])
        hint = (
            ""
            if not snapshot
            else " (the pipeline already has adapters: remove_adapter(pipe) to replace them)"
        )
        raise ValueError(f"cannot load adapter {folder}: {e}{hint}") from None
    return info


__getattr__ = deprecated_names(
    __name__,
    {"resolve_targets": ("nblora_diffusion.diffusion.adapter.linear_targets", lambda: linear_targets)},
)
