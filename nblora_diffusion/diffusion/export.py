"""Plain-LoRA interoperability: export to diffusers / kohya files, import from them.

An NB-LoRA update is exactly a LoRA of the same rank (core ``export_lora_state_dict``: lora_A = P_inᵀ,
lora_B = P_out·diag(g·scale), alpha = rank), so stock loaders reproduce it without this package. The
exports include the current slider scale (1 unless ``set_norm_bound`` moved it); a stock tool's LoRA
weight w on a scale-1 export equals the slider at δ' = w·δ.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from ..core import (
    NBLoRALinear,
    atomic_save_safetensors,
    export_lora_state_dict,
    injected_configs,
    load_nblora_state_dict,
    nblora_layers,
    nblora_state_dict,
    read_safetensors,
)
from ..fileio import staging_dir
from ..formats import DIFFUSERS_LORA_FILE, p_label
from .adapter import adapted_components
from .pipeline import architecture, components, is_sdxl

logger = logging.getLogger(__name__)

DIFFUSERS_WEIGHT_NAME = DIFFUSERS_LORA_FILE
# the tools that read each export; the app's downloads and train_dreambooth's report name them in these words
KOHYA_TOOLS = "AUTOMATIC1111, ComfyUI and Forge"
DIFFUSERS_TOOLS = "diffusers and PEFT"
# ss_base_model_version as kohya's trainer writes it: A1111 classes a file as SDXL only on the "sdxl_"
# prefix, as SD2 only on ss_v2 == "True", anything else with metadata as SD1
_KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_CLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_KOHYA_PREFIX_SDXL = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
_KOHYA_STARTS = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_Pair = tuple[torch.Tensor, torch.Tensor, float]  # down (r, in), up (out, r), alpha


def canonical_name(component: str, module: str) -> str:
    """Module path as stock tools spell it: CLIP text encoders under ``text_model.`` (transformers 5
    flattens CLIPTextModel; kohya/A1111/ComfyUI files and older diffusers keep the prefix)."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        return "text_model." + module
    return module


def _lora_layers(pipe) -> dict[str, dict[str, torch.Tensor]]:
    parts = adapted_components(pipe)
    if not parts:
        raise ValueError("the pipeline has no NB-LoRA adapters to export")
    return {
        name: {canonical_name(name, k): v for k, v in export_lora_state_dict(model).items()}
        for name, model in parts.items()
    }


def export_diffusers_lora(pipe, folder: str | os.PathLike) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` (diffusers/PEFT keys, float32, alpha = rank)
    with diffusers' own ``save_lora_weights``; ``pipe.load_lora_weights(folder)`` in plain diffusers
    then reproduces this pipeline's images. Returns the file path."""
    layers = _lora_layers(pipe)
    kwargs = {f"{name}_lora_layers": sd for name, sd in layers.items()}
    folder = Path(folder)
    with staging_dir(folder) as tmp:  # diffusers writes in place: stage it, then rename the file in
        type(pipe).save_lora_weights(tmp, weight_name=DIFFUSERS_WEIGHT_NAME, **kwargs)
        os.replace(tmp / DIFFUSERS_WEIGHT_NAME, folder / DIFFUSERS_WEIGHT_NAME)
    return folder / DIFFUSERS_WEIGHT_NAME


def export_kohya_lora(pipe, path: str | os.PathLike, resolution: int | tuple[int, int] | None = None) -> Path:
    """Write one safetensors file in the kohya / A1111 / ComfyUI key format:
    ``lora_unet_<module path with _>.lora_down.weight`` (r, in), ``.lora_up.weight`` (out, r) and
    ``.alpha`` (= r, so the file's update is exactly lora_up @ lora_down); text encoders as
    ``lora_te_`` (SDXL: ``lora_te1_`` / ``lora_te2_``). Returns the path.

    The metadata is what kohya's trainer writes and the loaders read (see ``kohya_metadata``);
    ``resolution`` (px, or (width, height)) is the training resolution, by default the model's native
    size. Logs a warning when AUTOMATIC1111 would silently drop part of the file (SDXL's second text
    encoder with only some of an attention layer's projections adapted).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"kohya LoRA path must end in .safetensors, got {path}")
    meta = kohya_metadata(pipe, resolution)  # validates before any work
    prefixes = _KOHYA_PREFIX_SDXL if is_sdxl(pipe) else _KOHYA_PREFIX
    out: dict[str, torch.Tensor] = {}
    layers = _lora_layers(pipe)
    for comp, sd in layers.items():
        for key, down in sd.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            name = prefixes[comp] + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = down
            out[f"{name}.lora_up.weight"] = sd[f"{module}.lora_B.weight"]
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    warning = _a1111_te2_warning([k.rsplit(".lora_", 1)[0] for k in layers.get("text_encoder_2", {})])
    if warning:
        logger.warning("%s: %s", path.name, warning)
    atomic_save_safetensors(out, path, meta)
    return path


def kohya_metadata(pipe, resolution: int | tuple[int, int] | None = None) -> dict[str, str]:
    """The safetensors metadata of a kohya export (all values strings, as safetensors requires).

    kohya's own keys: ``ss_base_model_version`` (sd_v1 / sd_v2 / sdxl_base_v1-0, "_v" appended for
    v-prediction on SD1/SD2 as kohya does), ``ss_v2``, ``ss_v_parameterization`` (from the scheduler's
    prediction_type), ``ss_network_module`` / ``ss_network_dim`` / ``ss_network_alpha`` (alpha = rank)
    and ``ss_resolution`` ("(width, height)"). The NB-LoRA bound of the main component (the UNet
    when adapted) as ``nblora_p``, ``nblora_delta`` or ``nblora_gamma`` (relative bound),
    ``nblora_parameterization`` and ``nblora_scale`` (the slider scale baked into the weights); every
    component's configs and scale as JSON in ``nblora_components``.
    """
    parts = adapted_components(pipe)
    if not parts:
        raise ValueError("the pipeline has no NB-LoRA adapters to export")
    rank = max(layer.rank for model in parts.values() for _, layer in nblora_layers(model))
    per_component = {}
    for comp, model in parts.items():
        per_component[comp] = {
            "configs": [
                {k: cfg[k] for k in ("rank", "p", "delta", "gamma", "parameterization") if cfg[k] is not None}
                for cfg in injected_configs(model)
            ],
            "scale": next(layer.scale for _, layer in nblora_layers(model)),
        }
    main = "unet" if "unet" in parts else next(iter(parts))
    cfg = injected_configs(parts[main])[0]
    p = float(cfg["p"])
    bound = (
        {"nblora_delta": str(cfg["delta"])}
        if cfg["delta"] is not None
        else {"nblora_gamma": str(cfg["gamma"])}
    )
    return {
        **network_metadata(pipe, rank, resolution),
        "nblora_p": p_label(p),
        **bound,
        "nblora_parameterization": cfg["parameterization"],
        "nblora_scale": str(per_component[main]["scale"]),
        "nblora_components": json.dumps(per_component),
    }


def network_metadata(pipe, rank: int, resolution: int | tuple[int, int] | None = None) -> dict[str, str]:
    """kohya's ``ss_*`` keys that A1111/ComfyUI read to class a LoRA file (any adapter kind)."""
    arch = architecture(pipe)
    scheduler_config = getattr(getattr(pipe, "scheduler", None), "config", {})
    v_pred = scheduler_config.get("prediction_type", "epsilon") == "v_prediction"
    version = _KOHYA_VERSION[arch] + ("_v" if v_pred and arch != "sdxl" else "")
    width, height = _resolution(pipe, resolution)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),  # every module's own alpha tensor equals its rank
        "ss_base_model_version": version,
        "ss_v2": str(arch == "sd2"),
        "ss_v_parameterization": str(v_pred),
        "ss_resolution": str((width, height)),
    }


def _resolution(pipe, resolution: int | tuple[int, int] | None) -> tuple[int, int]:
    """(width, height) in px: the given one, or the size the pipeline generates by default."""
    if resolution is None:
        size = pipe.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        factor = getattr(pipe, "vae_scale_factor", 8)
        return int(w) * factor, int(h) * factor
    pair = (resolution, resolution) if not isinstance(resolution, (tuple, list)) else tuple(resolution)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"resolution must be a positive int or (width, height), got {resolution!r}")
    return pair


def _a1111_te2_warning(modules: list[str]) -> str | None:
    """Why AUTOMATIC1111 would ignore part of SDXL's second text encoder, or None.

    A1111 loads that encoder (OpenCLIP, a fused in_proj attention) from a LoRA only for self-attention
    layers whose q_proj, k_proj, v_proj and out_proj are all present; a subset is dropped without a word.
    ``modules``: adapted module paths of text_encoder_2.
    """
    found: dict[str, set[str]] = {}
    for module in modules:
        attn, _, proj = module.rpartition(".")
        if proj in _CLIP_ATTN:
            found.setdefault(attn, set()).add(proj)
    partial = [a for a, projs in found.items() if len(projs) < len(_CLIP_ATTN)]  # in model order
    if not partial:
        return None
    have = ", ".join(p for p in _CLIP_ATTN if p in found[partial[0]])
    return (
        f"{len(partial)} self-attention layer(s) of text_encoder_2 adapt only part of "
        f"{'/'.join(_CLIP_ATTN)} (e.g. {partial[0]}: {have}); AUTOMATIC1111 ignores those layers of "
        "an SDXL LoRA unless all four are present (target all four, or leave them out)"
    )


# -- import ----------------------------------------------------------------------------------------
def _read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    path = Path(path)
    if path.is_dir():
        candidates = (
            [path / DIFFUSERS_WEIGHT_NAME]
            if (path / DIFFUSERS_WEIGHT_NAME).is_file()
            else sorted(path.glob("*.safetensors"))
        )
        if len(candidates) != 1:
            raise ValueError(
                f"{path}: expected {DIFFUSERS_WEIGHT_NAME} or one .safetensors file, found {len(candidates)}"
            )
        path = candidates[0]
    tensors, meta = read_safetensors(path, "LoRA")
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors, meta, path


def _pairs_kohya(pipe, sd: dict[str, torch.Tensor]) -> tuple[dict[str, _Pair], list[str]]:
    """'component.module' -> (down, up, alpha) from kohya keys, matched against the pipeline's Linear
    modules (underscored names are ambiguous, so they are looked up, never split); also the unknown names."""
    if is_sdxl(pipe) and any("input_blocks" in k or "output_blocks" in k or "middle_block" in k for k in sd):
        # kohya trains SDXL on the original (sgm) UNet: map its block numbering with diffusers' converter
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        sd = _maybe_map_sgm_blocks_to_diffusers(dict(sd), pipe.unet.config)
    prefixes = dict(_KOHYA_PREFIX_SDXL if is_sdxl(pipe) else _KOHYA_PREFIX)
    lookup = {}
    for comp, model in components(pipe).items():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, NBLoRALinear)) and not name.endswith(".base_layer"):
                for spelled in {name, canonical_name(comp, name)}:
                    lookup[prefixes[comp] + spelled.replace(".", "_")] = f"{comp}.{name}"
                    if comp == "text_encoder":  # SD1 "lora_te_" and SDXL "lora_te1_" both name it
                        lookup["lora_te_" + spelled.replace(".", "_")] = f"{comp}.{name}"
    pairs, unknown = {}, []
    for key, down in sd.items():
        if not key.endswith(".lora_down.weight"):
            continue
        lora_name = key[: -len(".lora_down.weight")]
        up = sd.get(f"{lora_name}.lora_up.weight")
        if up is None:
            raise ValueError(f"{key} has no matching lora_up.weight")
        alpha = sd.get(f"{lora_name}.alpha")
        target = lookup.get(lora_name)
        if target is None:
            unknown.append(lora_name)
            continue
        pairs[target] = (down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    return pairs, unknown


def _pairs_diffusers(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, _Pair]:
    """'component.module' -> (down, up, alpha) from diffusers/PEFT keys (old layouts: diffusers converts)."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    adapter_meta = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    pairs = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        part = {k[len(comp) + 1 :]: v for k, v in sd.items() if k.startswith(comp + ".")}
        if not part:
            continue
        alphas = {k[: -len(".alpha")]: float(v) for k, v in part.items() if k.endswith(".alpha")}
        part = {k: v for k, v in part.items() if not k.endswith(".alpha")}
        if comp == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        cfg = {k[len(comp) + 1 :]: v for k, v in adapter_meta.items() if k.startswith(comp + ".")}
        for key, down in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            up = part.get(f"{module}.lora_B.weight")
            if up is None:
                raise ValueError(f"{comp}.{key} has no matching lora_B.weight")
            alpha = alphas.get(module)
            if alpha is None:  # PEFT config saved by diffusers: scaling = alpha / r (rsLoRA: alpha / √r)
                hit = [
                    v
                    for k, v in (cfg.get("alpha_pattern") or {}).items()
                    if module == k or module.endswith("." + k)
                ]
                alpha = float(hit[0]) if hit else float(cfg.get("lora_alpha", down.shape[0]))
                if cfg.get("use_rslora"):
                    alpha *= math.sqrt(down.shape[0])
            pairs[f"{comp}.{module}"] = (down, up, alpha)
    return pairs


def import_lora(pipe, path: str | os.PathLike, project: bool = True) -> dict:
    """Start the pipeline's NB-LoRA adapters from a plain LoRA file (diffusers/PEFT or kohya keys).

    Add adapters first (``add_nblora``: it fixes rank, p and δ). Each adapted layer gets
    W = (alpha / r)·up @ down through the core's ``set_delta_weight``: with ``project=True`` a W of
    larger rank or norm is truncated/projected onto the bound, otherwise that is an error. Returns a
    report: layers set, layers clipped, the largest and mean relative change, and the names in the
    file without an adapter ("unmatched") or adapters without weights in the file ("untouched").
    """
    parts = adapted_components(pipe)
    if not parts:
        raise ValueError("the pipeline has no NB-LoRA adapters: add_nblora first to choose rank, p and δ")
    sd, meta, file = _read_lora_file(path)
    if not all(v.dtype.is_floating_point for v in sd.values()):
        raise ValueError(f"{file}: LoRA tensors must be floating point")
    unknown: list[str] = []
    if all(k.startswith(_KOHYA_STARTS) for k in sd):
        pairs, unknown = _pairs_kohya(pipe, sd)
    elif all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in sd):
        pairs = _pairs_diffusers(sd, meta)
    else:
        raise ValueError(
            f"{file}: unrecognised LoRA keys (expected diffusers 'unet.'/'text_encoder.' or kohya "
            f"'lora_unet_'/'lora_te_' prefixes), e.g. {next(iter(sd))!r}"
        )
    ours = {f"{comp}.{name}": layer for comp, model in parts.items() for name, layer in nblora_layers(model)}
    spelled = {f"{c}.{canonical_name(c, n)}": f"{c}.{n}" for c, n in (k.split(".", 1) for k in ours)}
    pairs = {spelled.get(k, k): v for k, v in pairs.items()}  # "text_model." spelling or not
    unmatched = sorted(unknown + [k for k in pairs if k not in ours])
    matched = {k: v for k, v in pairs.items() if k in ours}
    if not matched:
        raise ValueError(
            f"{file}: none of its {len(pairs)} LoRA layers has an NB-LoRA adapter in the pipeline"
        )
    planned = {}
    for name, (down, up, alpha) in matched.items():
        layer = ours[name]
        if (
            down.shape[1] != layer.in_features
            or up.shape[0] != layer.out_features
            or down.shape[0] != up.shape[1]
        ):
            raise ValueError(
                f"{name}: LoRA shapes up {tuple(up.shape)} @ down {tuple(down.shape)} do not fit "
                f"the layer ({layer.out_features}, {layer.in_features})"
            )
        dev = layer.nblora_delta.device
        planned[name] = (alpha / down.shape[0]) * (up.to(dev, torch.float64) @ down.to(dev, torch.float64))
    snapshot = {
        comp: {k: v.clone() for k, v in nblora_state_dict(model).items()} for comp, model in parts.items()
    }
    reports = {}
    try:
        for name, W in planned.items():
            reports[name] = ours[name].set_delta_weight(W, project=project)
    except ValueError as e:
        for comp, model in parts.items():  # all layers or none
            load_nblora_state_dict(model, snapshot[comp])
        raise ValueError(f"{name}: {e}") from None
    changes = [r["relative_change"] for r in reports.values()]
    return {
        "file": str(file),
        "layers": len(reports),
        "clipped": sum(c > 1e-6 for c in changes),
        "max_relative_change": max(changes),
        "mean_relative_change": sum(changes) / len(changes),
        "unmatched": unmatched,
        "untouched": sorted(set(ours) - set(reports)),
        "per_layer": reports,
    }
