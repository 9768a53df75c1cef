"""Prompt tokenization and encoding for SD1.x/2.x (one CLIP encoder) and SDXL (two, plus pooled)."""

from __future__ import annotations

import torch
from torch import nn


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (B, L), padded/truncated to the tokenizer's context length (77 for CLIP)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode(
    text_encoders: list[nn.Module], input_ids: list[torch.Tensor], sdxl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt_embeds (B, L, D), pooled (B, D2) or None), as the pipelines compute them.

    SD: the last hidden state of the encoder. SDXL: the penultimate hidden states of both encoders
    concatenated on the feature axis, and the projected pooled output of the second encoder.
    """
    if not sdxl:
        (enc,), (ids,) = text_encoders, input_ids
        return enc(ids.to(enc.device))[0], None
    embeds, pooled = [], None
    for enc, ids in zip(text_encoders, input_ids, strict=True):
        out = enc(ids.to(enc.device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output wins
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target: int) -> torch.Tensor:
    """SDXL micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w)."""
    tgt = torch.tensor([target, target]).expand(len(original_size), 2)
    return torch.cat([original_size, crop_top_left, tgt], dim=1).float()


class PromptEncoder:
    """Encodes the instance and class prompts for each batch.

    With frozen text encoders the two embeddings are computed once and repeated per example;
    when a text encoder trains they are recomputed every step (with a graph).
    """

    def __init__(
        self, pipe, sdxl: bool, instance_prompt: str, class_prompt: str | None, train_text: bool
    ) -> None:
        self.sdxl, self.train_text = sdxl, train_text
        self.encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
        prompts = [instance_prompt] + ([class_prompt] if class_prompt else [])
        self.ids = [tokenize(t, prompts) for t in tokenizers]  # per encoder: (P, L)
        self._cache: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _both(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.train_text:
            return encode(self.encoders, self.ids, self.sdxl)
        if self._cache is None:
            with torch.no_grad():
                self._cache = encode(self.encoders, self.ids, self.sdxl)
        return self._cache

    def precompute(self) -> None:
        """Encode the prompts now (frozen encoders only), so that the encoders may leave the device."""
        if self.train_text:
            raise ValueError("the text encoders train: their embeddings change every step")
        self._both()

    def __call__(self, num_instance: int, num_class: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings for a batch of ``num_instance`` instance then ``num_class`` class examples."""
        embeds, pooled = self._both()
        index = torch.tensor([0] * num_instance + [1] * num_class, device=embeds.device)
        return embeds.index_select(0, index), None if pooled is None else pooled.index_select(0, index)
