"""Diffusers state dicts -> the original (LDM / A1111 / ComfyUI) single-file key layout, for tests.

The inverse of diffusers' single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``):
it writes the keys real SD1.x / SD2.x / SDXL checkpoints hold, so that a tiny random pipeline can be
saved as the kind of .safetensors file users download and loaded back through ``from_single_file``.

    python -m nblora_diffusion.testing.ldm_layout PIPELINE_DIR OUT.safetensors

Layouts (prefixes of the real files):

- UNet ``model.diffusion_model.``: ``input_blocks.k.0`` resnets, ``.1`` attentions, ``.0.op`` downsamplers;
  ``middle_block.0/1/2``; ``output_blocks.k.0/.1`` and the upsampler at ``.1.conv`` or ``.2.conv``.
- VAE ``first_stage_model.``: ``encoder.down.i.block.j``, ``decoder.up.(n-1-i)``, ``mid.block_1/2``,
  ``mid.attn_1`` with 1×1-conv q/k/v/proj_out weights.
- SD1.x text encoder ``cond_stage_model.transformer.text_model.*`` (transformers' CLIP names, with the
  ``text_model.`` level that transformers 5 no longer has on ``CLIPTextModel``); SDXL's first encoder the same
  under ``conditioner.embedders.0.transformer.``.
- OpenCLIP text encoders (SD2.x ``cond_stage_model.model.``, SDXL's second
  ``conditioner.embedders.1.model.``): ``transformer.resblocks.i`` with fused ``attn.in_proj_weight``
  (q; k; v), ``positional_embedding``, ``ln_final``, ``text_projection`` = the transposed projection.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {  # diffusers -> LDM, the same table as diffusers' DIFFUSERS_TO_LDM_MAPPING["unet"]
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {
    "conv_norm_out": "norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _split(key: str, n: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in the LDM layout (without the model prefix)."""
    per_block = config["layers_per_block"]
    out: dict[str, torch.Tensor] = {}

    def resnet(rest: str) -> str:
        name, tail = rest.split(".", 1)
        return f"{_UNET_RESNET.get(name, name)}.{tail}"

    for key, value in state_dict.items():
        top, _, leaf = key.rpartition(".")
        if top in _UNET_TOP:
            out[f"{_UNET_TOP[top]}.{leaf}"] = value
            continue
        if key.startswith("down_blocks."):
            (_, i, kind, j), rest = _split(key, 4)
            i, j = int(i), int(j)
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.k.0.op.*
                k = 1 + i * (per_block + 1) + per_block
                out[f"input_blocks.{k}.0.op.{rest.removeprefix('conv.')}"] = value
            else:
                k = 1 + i * (per_block + 1) + j
                sub = "0." + resnet(rest) if kind == "resnets" else "1." + rest
                out[f"input_blocks.{k}.{sub}"] = value
        elif key.startswith("mid_block."):
            (_, kind, j), rest = _split(key, 3)
            # middle_block.0 / .2 are the two resnets, .1 the attention
            k = 2 * int(j) if kind == "resnets" else 1
            out[f"middle_block.{k}.{resnet(rest) if kind == 'resnets' else rest}"] = value
        elif key.startswith("up_blocks."):
            (_, i, kind, j), rest = _split(key, 4)
            i, j = int(i), int(j)
            if (
                kind == "upsamplers"
            ):  # after the block's attention (.2) or, without one, after its resnet (.1)
                k = i * (per_block + 1) + per_block
                has_attention = any(s.startswith(f"up_blocks.{i}.attentions.") for s in state_dict)
                out[f"output_blocks.{k}.{2 if has_attention else 1}.{rest}"] = value
            else:
                k = i * (per_block + 1) + j
                sub = "0." + resnet(rest) if kind == "resnets" else "1." + rest
                out[f"output_blocks.{k}.{sub}"] = value
        else:
            raise ValueError(f"no LDM name for UNet key {key!r}")
    if len(out) != len(state_dict):
        raise ValueError(f"{len(state_dict) - len(out)} UNet keys collided in the LDM layout")
    return out


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM layout (attention weights as 1×1 convs)."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        if part not in ("encoder", "decoder"):
            raise ValueError(f"no LDM name for VAE key {key!r}")
        name, _, tail = rest.partition(".")
        if name in ("conv_in", "conv_out", "conv_norm_out"):
            out[f"{part}.{_VAE_TOP.get(name, name)}.{tail}"] = value
        elif name in ("down_blocks", "up_blocks"):
            (i, kind, j), leaf = _split(tail, 3)
            ldm_i = int(i) if name == "down_blocks" else n_up - 1 - int(i)  # the decoder counts upwards
            level = f"{part}.{'down' if name == 'down_blocks' else 'up'}.{ldm_i}"
            if kind == "resnets":
                out[f"{level}.block.{j}.{leaf.replace('conv_shortcut', 'nin_shortcut')}"] = value
            else:  # downsamplers.0.conv / upsamplers.0.conv
                out[f"{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{leaf}"] = value
        elif name == "mid_block":
            (kind, j), leaf = _split(tail, 2)
            if kind == "resnets":
                out[f"{part}.mid.block_{int(j) + 1}.{leaf.replace('conv_shortcut', 'nin_shortcut')}"] = value
            else:
                module, _, param = leaf.rpartition(".")
                if module not in _VAE_ATTENTION:
                    raise ValueError(f"no LDM name for VAE key {key!r}")
                if module != "group_norm" and param == "weight":
                    value = value[:, :, None, None]  # (C, C) Linear -> (C, C, 1, 1) conv, as LDM stores them
                out[f"{part}.mid.attn_1.{_VAE_ATTENTION[module]}.{param}"] = value
        else:
            raise ValueError(f"no LDM name for VAE key {key!r}")
    return out


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict with the ``text_model.`` level of the original files.

    Includes ``text_model.embeddings.position_ids`` (int64, 1 × max positions), as the real SD1.x files do.
    """
    out = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}
    key = "text_model.embeddings.position_embedding.weight"
    out["text_model.embeddings.position_ids"] = torch.arange(out[key].shape[0], dtype=torch.int64)[None]
    return out


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict in OpenCLIP's layout."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()  # (proj, d) -> (d, proj)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    names["self_attn.out_proj"] = "attn.out_proj"
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{param}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv, 0)  # 3 × (d, d) -> (3d, d)
            for a, b in names.items():
                out[f"{dst}{b}.{param}"] = sd.pop(f"{src}{a}.{param}")
    if sd:
        raise ValueError(f"no OpenCLIP name for text encoder keys {sorted(sd)[:3]}")
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    """Every weight of an SD1.x (CLIP text encoder), SD2.x (OpenCLIP) or SDXL pipeline under its
    single-file name; SD1.x vs SD2.x as ``diffusion.architecture`` tells them (Conv2d vs Linear UNet
    projections)."""
    from ..diffusion.pipeline import architecture

    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()})
    te = pipe.text_encoder.state_dict()
    arch = architecture(pipe)
    if arch == "sdxl":
        out.update({SDXL_CLIP_PREFIX + k: v for k, v in clip_to_ldm(te).items()})
        te2 = open_clip_to_ldm(pipe.text_encoder_2.state_dict())
        out.update({SDXL_OPEN_CLIP_PREFIX + k: v for k, v in te2.items()})
    elif arch == "sd1":
        out.update({SD1_CLIP_PREFIX + k: v for k, v in clip_to_ldm(te).items()})
    else:
        out.update({SD2_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_to_ldm(te).items()})
    return out


def save_ldm_checkpoint(pipe_or_folder, path: str | Path) -> Path:
    """Write a pipeline (or a diffusers pipeline folder) as one LDM-layout .safetensors file."""
    from ..core.state import atomic_save_safetensors

    pipe = pipe_or_folder
    if isinstance(pipe_or_folder, (str, Path)):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(pipe_or_folder))
    path = Path(path)
    atomic_save_safetensors(pipeline_to_ldm(pipe), path, metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nblora_diffusion.testing.ldm_layout", description=__doc__.split("\n")[0]
    )
    parser.add_argument("pipeline", help="diffusers pipeline folder (e.g. one written by testing.tiny_sd)")
    parser.add_argument("out", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    print(save_ldm_checkpoint(args.pipeline, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
