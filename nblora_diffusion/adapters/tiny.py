"""Tiny random-weight LLaMA and ViT models built from transformers configs (no download).

Written with ``save_pretrained`` so tests and examples load them through the real
``from_pretrained`` path, as they would a hub checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    """A LlamaConfig small enough for CPU tests: 2 layers, hidden 32, GQA with 2 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**_LLAMA, **overrides})


_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in LLaMA-2/3 and Mistral
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


def tiny_vit_config(**overrides):
    """A ViTConfig for 8×8 single-channel images (scikit-learn digits): 16 patches of 2×2."""
    from transformers import ViTConfig

    return ViTConfig(**{**_VIT, **overrides})


_VIT = dict(
    image_size=8,
    patch_size=2,
    num_channels=1,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=10,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def make_tiny_llama(outdir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random LlamaForCausalLM to ``outdir`` (loadable with ``from_pretrained``)."""
    from transformers import LlamaForCausalLM

    return _save(LlamaForCausalLM, tiny_llama_config(**overrides), outdir, seed)


def make_tiny_vit(outdir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random ViTForImageClassification to ``outdir`` (loadable with ``from_pretrained``)."""
    from transformers import ViTForImageClassification

    return _save(ViTForImageClassification, tiny_vit_config(**overrides), outdir, seed)


def _save(model_class, config, outdir: str | os.PathLike, seed: int) -> Path:
    torch.manual_seed(seed)
    model_class(config).save_pretrained(outdir)
    return Path(outdir)
