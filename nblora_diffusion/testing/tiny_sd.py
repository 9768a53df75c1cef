"""Tiny random-weight Stable Diffusion (SD1.x-style or SDXL-style) pipeline folders, offline.

The folders have the real diffusers layout (model_index.json, unet/, vae/, text_encoder(_2)/,
tokenizer(_2)/, scheduler/), so they load through ``StableDiffusionPipeline.from_pretrained`` /
``StableDiffusionXLPipeline.from_pretrained`` with no network. The architectures are the real ones
at toy width: a UNet2DConditionModel with cross-attention transformer blocks, an AutoencoderKL with
the real ×8 downsampling (4 resolution levels), CLIP text encoders and a CLIP byte-level BPE
tokenizer built from a small vocabulary written here. Default output: 64×64 px images (8×8 latents).

    python -m nblora_diffusion.testing.tiny_sd OUTDIR [--sdxl] [--seed N]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..fileio import atomic_dir

SAMPLE_SIZE = 8  # latent side: 8 × 8 latents -> 64 × 64 px images through the ×8 VAE
TEXT_WIDTH = 32  # hidden size of each tiny CLIP text encoder
MAX_LENGTH = 77  # CLIP's context length, as in the real tokenizers

# Whole-word tokens (the rest of any prompt falls back to byte-level characters): prompt words of the
# DreamBooth subjects and the usual prompt templates.
_WORDS = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "painting", "style", "sks", "zwx",
    "dog", "cat", "backpack", "bag", "toy", "person", "man", "woman", "car", "house", "tree", "beach", "city",
    "snow", "forest", "table", "red", "blue", "green", "yellow", "purple", "black", "white", "wearing", "hat",
    "sitting", "floating", "water", "top", "mountain", "jungle", "street", "night", "high", "quality",
    "shiny", "wet", "cube", "shaped", "sleeping", "vase", "bowl", "boot", "teapot", "clock", "glasses",
    "sunglasses", "candle", "book", "cartoon", "sculpture", "bronze",
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the byte-level alphabet of the BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_vocab(words: tuple[str, ...] = _WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary and merge list: every byte (alone and word-final) plus whole-word
    tokens for ``words``."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "p h", "ph o", ... "phot o</w>"
            pair = (parts[0], parts[1])
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
                if merged not in tokens:
                    tokens.append(merged)
            parts = [merged] + parts[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def bpe_tokenizer(words: tuple[str, ...] = _WORDS, max_length: int = MAX_LENGTH):
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _text_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    vocab, _ = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_WIDTH if projection else 512,
        hidden_act="gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels: the real ×8 downsampling
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SAMPLE_SIZE * 8,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # SD's training noise schedule; DDPMScheduler.from_pretrained reads the same config
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
    )  # fmt: skip


def _sd_pipeline():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=32,
    )  # SD1.x layout: Conv2d proj_in/proj_out (use_linear_projection=False)
    tokenizer = bpe_tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), projection=False))
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,  # SDXL layout: Linear proj_in/proj_out
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled text embedding (TEXT_WIDTH) + 6 micro-conditioning ids × time_dim
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * time_dim,
        cross_attention_dim=2 * TEXT_WIDTH,  # the two encoders' hidden states are concatenated
        norm_num_groups=32,
    )
    tokenizer, tokenizer_2 = bpe_tokenizer(), bpe_tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), projection=False))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer_2), projection=True))
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(), add_watermarker=False,
    )  # fmt: skip


def make_tiny_sd(outdir: str | os.PathLike, sdxl: bool = False, seed: int = 0) -> Path:
    """Write a random-weight tiny SD1.x-style (or SDXL-style) diffusers pipeline folder; returns its path.

    The same seed gives the same weights. The folder is written to a temporary sibling and renamed,
    so an interrupted call never leaves a half-written pipeline behind.
    """
    outdir = Path(outdir)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise ValueError(f"output folder {outdir} exists and is not empty")
    outdir.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _sdxl_pipeline() if sdxl else _sd_pipeline()
    with atomic_dir(outdir) as tmp:
        pipe.save_pretrained(tmp)
        write_bpe_files(tmp)
    return outdir


def write_bpe_files(folder: Path, words: tuple[str, ...] = _WORDS) -> None:
    """vocab.json + merges.txt next to tokenizer.json, for tokenizer classes that read those files."""
    vocab, merges = tiny_vocab(words)
    for sub in ("tokenizer", "tokenizer_2"):
        if (folder / sub).is_dir():
            (folder / sub / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
            (folder / sub / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


_CACHE: dict[bool, Path] = {}


def tiny_sd_path(sdxl: bool = False) -> Path:
    """A tiny pipeline folder (seed 0) built once per process in a temporary directory, removed at exit.

    Treat it as read-only: it is shared by every caller in the process.
    """
    if sdxl not in _CACHE or not (_CACHE[sdxl] / "model_index.json").is_file():
        root = Path(tempfile.mkdtemp(prefix="nblora_tiny_sd_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE[sdxl] = make_tiny_sd(root / ("tiny-sdxl" if sdxl else "tiny-sd"), sdxl=sdxl, seed=0)
    return _CACHE[sdxl]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nblora_diffusion.testing.tiny_sd", description=__doc__.split("\n")[0]
    )
    parser.add_argument("outdir", help="folder to write (must not exist or be empty)")
    parser.add_argument(
        "--sdxl", action="store_true", help="SDXL layout (two text encoders, text-time conditioning)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    try:
        path = make_tiny_sd(args.outdir, sdxl=args.sdxl, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
