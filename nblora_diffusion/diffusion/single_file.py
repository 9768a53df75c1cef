"""Single-file SD1.x / SD2.x / SDXL checkpoints (A1111 / ComfyUI .safetensors), loaded offline.

diffusers' ``from_single_file`` fetches the configs and tokenizer files of a reference repository from
the hub unless it is given a local ``config=`` folder. This package ships those folders (configs/: the
published configs of SD1.5, SD2.1-base, SD2.1 (768, v-prediction) and SDXL base 1.0, no weights); the
CLIP BPE vocabulary is generated from the merges file in open_clip_torch's wheel into a cache folder at
first use (``default_cache_dir()``), so loading never touches the network.

The architecture comes from the checkpoint's keys: diffusers' ``infer_diffusers_model_type`` first; its
answer "v1" is its fallback for anything it does not recognise (it keys on layer indices that only
real-size models have), so the text encoder layout then decides (CLIP -> SD1.x, OpenCLIP -> SD2.x, both ->
SDXL). ε- vs v-prediction is not in the keys of SD2.x files; see ``prediction_type``.

The config folders and the tokenizer files live in ``skeletons``, the identity of a base model file
(``base_model_id``) in ``base_model_id``; both are re-exported here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .base_model_id import (
    SINGLE_FILE_SUFFIXES,
    base_model_id,
    file_base_model_id,
    is_single_file,
    same_base_model,
)
from .skeletons import (
    CONFIGS,
    SKELETONS,
    clip_bpe,
    default_cache_dir,
    skeleton_dir,
    write_clip_tokenizer_files,
)

logger = logging.getLogger(__name__)

# the shipped config folders -> the architecture each is for
ARCHITECTURE_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
PIPELINE_CLASSES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# ComfyUI's SD2.x rule (comfy/supported_models.py, SD20.model_type): v-prediction when the std of this bias
# exceeds 0.09. Empirical (ComfyUI's own comment doubts it), hence config="sd21-base" / "sd21-v" to override
_SD2_V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_STD = 0.09


# -- reading the checkpoint -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The keys and shapes of a single-file checkpoint (as meta tensors) and a reader for its tensors."""

    path: Path
    tensors: Mapping[str, torch.Tensor]  # meta tensors for .safetensors (shapes only), real ones for .ckpt
    read: Callable[[list[str]], dict[str, torch.Tensor]]


def read_checkpoint(path: str | os.PathLike, allow_ckpt: bool = False) -> Checkpoint:
    """Open a .safetensors file (header only) or, with ``allow_ckpt``, a .ckpt (torch's weights-only loader).

    A .ckpt is a pickle: it is refused unless ``allow_ckpt`` is set, and even then read with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, never arbitrary objects).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors' own error types for truncated / foreign files
            raise ValueError(f"cannot read {path}: truncated or not a safetensors file ({e})") from None

        def read(keys: list[str]) -> dict[str, torch.Tensor]:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}

        return Checkpoint(path, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, read)
    if suffix == ".ckpt":
        if not allow_ckpt:
            raise ValueError(
                f"{path} is a pickled .ckpt checkpoint: refused unless allowed (allow_ckpt=True reads it "
                "with torch's weights-only loader); better, convert it to .safetensors"
            )
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot read {path} with torch's weights-only loader: {first}") from None
        while isinstance(sd, dict) and "state_dict" in sd:  # Lightning checkpoints nest the weights
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return Checkpoint(path, tensors, lambda keys: {k: tensors[k] for k in keys})
    raise ValueError(f"{path}: expected a .safetensors (or .ckpt) checkpoint file")


def checkpoint_architecture(checkpoint: Checkpoint) -> str:
    """The architecture, "sd1", "sd2" or "sdxl", from the keys; a one-line ValueError naming anything else."""
    from diffusers.loaders import single_file_utils as sfu

    sd, name = checkpoint.tensors, checkpoint.path.name
    try:
        model_type = sfu.infer_diffusers_model_type(sd)
    except Exception as e:  # a branch for another family that needs tensor values
        raise ValueError(f"{name}: cannot tell the model type from its keys ({e})") from None
    if model_type not in ("v1", "v2", "xl_base"):
        raise ValueError(
            f"{name} is a {model_type!r} checkpoint (diffusers' infer_diffusers_model_type); supported are "
            "SD1.x, SD2.x and SDXL base text-to-image checkpoints"
        )
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        example = next(iter(sd), None)
        raise ValueError(
            f"{name} holds no Stable Diffusion UNet ({UNET_PREFIX}* keys): {len(sd)} tensors such as "
            f"{example!r} (a LoRA, an embedding or a diffusers component file?)"
        )
    if not any(k.startswith(VAE_PREFIX) for k in sd):
        raise ValueError(f"{name} holds no VAE ({VAE_PREFIX}* keys): a UNet-only file, not a full checkpoint")
    clip, open_clip = sfu.is_clip_model(sd), sfu.is_open_clip_model(sd)
    xl = sfu.is_clip_sdxl_model(sd) and sfu.is_open_clip_sdxl_model(sd)
    layouts = {"v1": clip, "v2": open_clip, "xl_base": xl}
    if model_type != "v1" and not layouts[model_type]:
        raise ValueError(f"{name}: the UNet is {model_type!r} but the text encoder weights do not match it")
    if model_type == "xl_base" or (model_type == "v1" and xl):
        return "sdxl"
    if model_type == "v2" or (model_type == "v1" and open_clip):
        return "sd2"
    if clip:
        return "sd1"
    if sfu.is_open_clip_sdxl_refiner_model(sd):
        raise ValueError(f"{name} is an SDXL refiner checkpoint; supported are SD1.x, SD2.x and SDXL base")
    raise ValueError(
        f"{name} has a UNet but no text encoder weights in a known layout (cond_stage_model.transformer.*, "
        "cond_stage_model.model.* or conditioner.embedders.*)"
    )


def prediction_type(checkpoint: Checkpoint, architecture: str) -> str:
    """The scheduler's prediction type, "epsilon" or "v_prediction".

    A ``v_pred`` marker key (the kohya / ComfyUI convention) means v; SD2.x files carry no marker, so
    ComfyUI's weight statistic decides (std of one norm bias > 0.09: v); everything else is ε.
    """
    if "v_pred" in checkpoint.tensors:
        return "v_prediction"
    if architecture != "sd2" or _SD2_V_PROBE not in checkpoint.tensors:
        return "epsilon"
    conv_in = checkpoint.tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:  # inpainting-style inputs are never v (ComfyUI)
        return "epsilon"
    bias = checkpoint.read([_SD2_V_PROBE])[_SD2_V_PROBE].float()
    return "v_prediction" if float(bias.std(unbiased=False)) > _SD2_V_STD else "epsilon"


def skeleton_for(architecture: str, prediction: str) -> str:
    """The shipped config folder for an architecture and prediction type."""
    if architecture == "sd2":
        return "sd21-v" if prediction == "v_prediction" else "sd21-base"
    return {"sd1": "sd15", "sdxl": "sdxl-base"}[architecture]


# -- loading --------------------------------------------------------------------------------------------


def load_single_file(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    config: str | os.PathLike | None = None,
    allow_ckpt: bool = False,
    cache_dir: str | os.PathLike | None = None,
):
    """A StableDiffusion(XL)Pipeline from one checkpoint file, offline.

    ``config``: None (the shipped skeleton for the inferred architecture and prediction type), the name
    of a skeleton (``SKELETONS``, to override the inference, e.g. "sd21-v"), or a diffusers folder with
    this model's configs and tokenizers (e.g. for a model that is not of a standard size). Any problem
    (unknown layout, truncated file, another model family, weights that do not fit the configs) is a
    one-line ValueError. The pipeline's ``name_or_path`` is the file's path.
    """
    import diffusers

    ckpt = read_checkpoint(path, allow_ckpt=allow_ckpt)
    arch = checkpoint_architecture(ckpt)
    pred = prediction_type(ckpt, arch)
    name = ckpt.path.name
    skeleton = str(config) if config is not None and str(config) in SKELETONS else None
    if config is None:
        skeleton = skeleton_for(arch, pred)
    if skeleton is not None:
        if SKELETONS[skeleton] != arch:
            raise ValueError(f"{name} is an {ARCHITECTURE_NAMES[arch]} checkpoint, not {skeleton}")
        config_dir = skeleton_dir(skeleton, cache_dir)
    else:
        config_dir = Path(config).expanduser()
        _check_config_folder(config_dir, arch, name)
    logger.info("%s: %s, %s, configs from %s", name, ARCHITECTURE_NAMES[arch], pred, skeleton or config_dir)
    cls = getattr(diffusers, PIPELINE_CLASSES[arch])
    parts = {}
    if skeleton is not None:
        scheduler_cfg = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
        if scheduler_cfg.get("prediction_type") != pred:  # e.g. an SDXL file with a v_pred marker
            scheduler_cls = getattr(diffusers, scheduler_cfg["_class_name"])
            parts["scheduler"] = scheduler_cls.from_config(scheduler_cfg, prediction_type=pred)
    try:
        if arch == "sdxl" and _equal_text_widths(ckpt):
            parts["text_encoder_2"] = _sdxl_text_encoder_2(ckpt, config_dir, dtype)
        pipe = cls.from_single_file(
            str(ckpt.path), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **parts
        )
    except Exception as e:  # diffusers/transformers raise many types; one line for the user
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # weights absent from the file stay on the meta device, and diffusers then fails to move them
        if "meta tensor" in msg:
            missing = _missing_weights(ckpt, config_dir, arch)
            if missing:
                raise _lacks(name, *missing, skeleton or config_dir) from None
        # diffusers' shape mismatch reads "Cannot load <name> because <key> expected shape ..., but got
        # .... If you want to instead overwrite ...": keep the middle
        msg = re.sub(r"^Cannot load \S* ?because ", "", msg).split(" If you want to instead overwrite")[0]
        hint = " (a model of another size needs config=<a diffusers folder of it>)" if skeleton else ""
        raise ValueError(
            f"cannot load {name} as {ARCHITECTURE_NAMES[arch]} with the configs in {skeleton or config_dir}: "
            f"{msg}{hint}"
        ) from None
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        missing = [n for n, p in module.named_parameters() if p.is_meta] if module is not None else []
        if missing:
            raise _lacks(name, part, missing, skeleton or config_dir)
    pipe.register_to_config(_name_or_path=str(ckpt.path))  # as from_pretrained records its source
    return pipe


def _lacks(name: str, part: str, missing: list[str], where) -> ValueError:
    return ValueError(
        f"{name} lacks {len(missing)} {part} weights (e.g. {missing[0]!r}): a partial checkpoint, or one "
        f"that does not fit the configs in {where}"
    )


def _missing_weights(ckpt: Checkpoint, config_dir: Path, arch: str) -> tuple[str, list[str]] | None:
    """(component, weights its config needs that diffusers' converters do not find in the file)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = ckpt.tensors
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_dir, subfolder="unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
    convert = {
        "unet": (unet, lambda: sfu.convert_ldm_unet_checkpoint(sd, unet.config)),
        "vae": (vae, lambda: sfu.convert_ldm_vae_checkpoint(sd, vae.config)),
        "text_encoder": (
            text,
            lambda: (
                sfu.convert_open_clip_checkpoint(text, sd, prefix="cond_stage_model.model.")
                if arch == "sd2"
                else sfu.convert_ldm_clip_checkpoint(sd)
            ),
        ),
    }
    for part, (model, fn) in convert.items():
        try:
            found = {k.removeprefix("text_model.") for k in fn()}
        except KeyError as e:  # a converter that indexes the key directly
            return part, [str(e).strip("'")]
        missing = sorted({k.removeprefix("text_model.") for k in model.state_dict()} - found)
        if missing:
            return part, missing
    return None


def pipeline_class(folder: Path, what: str) -> str | None:
    """The ``_class_name`` in a diffusers folder's model_index.json; one-line ValueError naming ``what``
    when the file is missing or not JSON."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{what} is not a diffusers pipeline folder: no model_index.json")
    try:
        return json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from None


def _check_config_folder(folder: Path, arch: str, name: str) -> None:
    class_name = pipeline_class(folder, f"config folder {folder}")
    if class_name != PIPELINE_CLASSES[arch]:
        raise ValueError(
            f"{name} is an {ARCHITECTURE_NAMES[arch]} checkpoint, but config folder {folder} holds a "
            f"{class_name}"
        )


def _equal_text_widths(ckpt: Checkpoint) -> bool:
    """Both SDXL text encoders of the same width: never at real size (768 and 1280), but in test models."""
    first = ckpt.tensors.get(
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
    )
    second = ckpt.tensors.get(SDXL_OPEN_CLIP_PREFIX + "positional_embedding")
    return first is not None and second is not None and first.shape[-1] == second.shape[-1]


def _sdxl_text_encoder_2(ckpt: Checkpoint, config_dir: Path, dtype: torch.dtype):
    """SDXL's OpenCLIP-bigG encoder, converted with diffusers' own converter.

    diffusers picks the converter for ``text_encoder_2`` by comparing the widths of the two encoders'
    position embeddings, which gives the second encoder the first one's weights when the widths are equal;
    naming the converter here removes the ambiguity (used only then, so real SDXL files take diffusers'
    path and are not read twice).
    """
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    keys = [k for k in ckpt.tensors if k.startswith(SDXL_OPEN_CLIP_PREFIX)]
    cfg = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder_2", local_files_only=True)
    with init_empty_weights():
        model = CLIPTextModelWithProjection(cfg)
    state = convert_open_clip_checkpoint(model, ckpt.read(keys), prefix=SDXL_OPEN_CLIP_PREFIX)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(
            f"text_encoder_2: {len(missing)} weights are missing from the file, e.g. {missing[0]}"
        )
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:  # worded as diffusers' check for the other parts
            raise ValueError(f"{key} expected shape {own[key].shape}, but got {value.shape}.")
    model.load_state_dict(state, strict=False, assign=True)
    return model.to(dtype).eval()


__all__ = [  # the module's names, the re-exported ones included
    "ARCHITECTURE_NAMES",
    "base_model_id",
    "Checkpoint",
    "checkpoint_architecture",
    "clip_bpe",
    "CONFIGS",
    "default_cache_dir",
    "file_base_model_id",
    "is_single_file",
    "load_single_file",
    "pipeline_class",
    "PIPELINE_CLASSES",
    "prediction_type",
    "read_checkpoint",
    "same_base_model",
    "SDXL_OPEN_CLIP_PREFIX",
    "SINGLE_FILE_SUFFIXES",
    "skeleton_dir",
    "skeleton_for",
    "SKELETONS",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "write_clip_tokenizer_files",
]
