"""Tiny random-weight LLaMA and ViT models built from transformers configs (no download).

Written with ``save_pretrained`` so tests and examples load them through the real
``from_pretrained`` path, as they would a hub checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_BODY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)  # both: 2 blocks of width 32
# config values by transformers config class: small enough for CPU tests
_CONFIGS = {
    "LlamaConfig": dict(
        _BODY,
        vocab_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in LLaMA-2/3 and Mistral
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    ),
    "ViTConfig": dict(
        _BODY,
        image_size=8,
        patch_size=2,
        num_channels=1,
        num_attention_heads=2,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ),
}


def _config(class_name: str, overrides: dict):
    import transformers

    return getattr(transformers, class_name)(**{**_CONFIGS[class_name], **overrides})


def tiny_llama_config(**overrides):
    """A LlamaConfig small enough for CPU tests: 2 layers, hidden 32, GQA with 2 KV heads."""
    return _config("LlamaConfig", overrides)


def tiny_vit_config(**overrides):
    """A ViTConfig for 8×8 single-channel images (scikit-learn digits): 16 patches of 2×2."""
    return _config("ViTConfig", overrides)


def make_tiny_llama(outdir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random LlamaForCausalLM to ``outdir`` (loadable with ``from_pretrained``)."""
    return _save("LlamaForCausalLM", tiny_llama_config(**overrides), outdir, seed)


def make_tiny_vit(outdir: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """Save a random ViTForImageClassification to ``outdir`` (loadable with ``from_pretrained``)."""
    return _save("ViTForImageClassification", tiny_vit_config(**overrides), outdir, seed)


def _save(class_name: str, config, outdir: str | os.PathLike, seed: int) -> Path:
    import transformers

    torch.manual_seed(seed)
    getattr(transformers, class_name)(config).save_pretrained(outdir)
    return Path(outdir)
