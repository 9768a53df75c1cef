"""Inference controls: the norm-bound slider, merge / unmerge, removing adapters.

Adapters materialise their Cayley factors once (the core's factor cache, in eval mode), so unmerged
inference costs two thin matmuls per adapted layer; merging adds the update into the base weight for
zero overhead. In fp16/bf16 ``W + ΔW - ΔW`` does not round back to ``W``, so merging low-precision
weights keeps a CPU copy of the base weight by default, on the layer (``NBLoRALinear.merge(keep_base)``,
the same for the LLM/ViT path): unmerge and slider moves while merged then restore it exactly.
"""

from __future__ import annotations

from torch import nn

from ..core import nblora_layers, unload_nblora
from .adapter import adapted_components


def _require(pipe) -> dict[str, nn.Module]:
    parts = adapted_components(pipe)
    if not parts:
        raise ValueError("the pipeline has no NB-LoRA adapters (add_nblora or load_adapter first)")
    return parts


def _reference_delta(parts: dict[str, nn.Module]) -> float:
    """The δ that ``delta_prime`` refers to: the UNet adapters' common bound (else the text encoders')."""
    main = parts.get("unet") or next(iter(parts.values()))
    deltas = sorted({round(layer.delta, 12) for _, layer in nblora_layers(main)})
    if len(deltas) > 1:
        raise ValueError(
            f"the adapters have per-layer bounds δ (from {deltas[0]:.4g} to {deltas[-1]:.4g}: a relative "
            "bound γ); set the slider with scale=δ'/δ instead"
        )
    return deltas[0]


def set_norm_bound(pipe, delta_prime: float | None = None, scale: float | None = None) -> float:
    """The norm-bound slider: inference bound δ' (or scale = δ'/δ) for every adapter of the pipeline.

    Every singular value of every update scales by δ'/δ (the core rescales S; no Cayley, no
    retraining). 0 gives the base model exactly, 1 the trained adapter; moves are reversible, also
    for merged adapters (re-merged from the kept base weights, or unmerge/re-merge in fp32).
    ``delta_prime`` is relative to the UNet adapters' δ (an absolute bound); the same scale applies to
    the text encoders. Returns the scale applied.
    """
    if (delta_prime is None) == (scale is None):
        raise ValueError(
            f"give exactly one of delta_prime and scale, got delta_prime={delta_prime}, scale={scale}"
        )
    parts = _require(pipe)
    if delta_prime is not None:
        if isinstance(delta_prime, bool) or not isinstance(delta_prime, (int, float)) or not delta_prime >= 0:
            raise ValueError(f"delta_prime must be a number >= 0, got {delta_prime!r}")
        scale = float(delta_prime) / _reference_delta(parts)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    for model in parts.values():
        for _, layer in nblora_layers(model):
            layer.scale = scale  # a merged layer unmerges and re-merges itself (exactly, from its base copy)
    return float(scale)


def get_norm_bound(pipe) -> dict:
    """Current slider state: the scale(s) and the distinct bounds δ of the adapters."""
    parts = _require(pipe)
    scales = sorted({layer.scale for m in parts.values() for _, layer in nblora_layers(m)})
    deltas = sorted({round(layer.delta, 12) for m in parts.values() for _, layer in nblora_layers(m)})
    merged = {layer.merged for m in parts.values() for _, layer in nblora_layers(m)}
    return {"scale": scales[0] if len(scales) == 1 else scales, "delta": deltas, "merged": any(merged)}


def merge_adapter(pipe, keep_base: bool | None = None) -> None:
    """Add every adapter's update into its base weight: inference at the base model's cost.

    ``keep_base`` keeps a CPU copy of each adapted base weight so that unmerging and slider moves are
    exact; by default only for fp16/bf16 weights (in fp32 the subtraction error is ~1e-7 relative).
    """
    for model in _require(pipe).values():
        for _, layer in nblora_layers(model):
            if not layer.merged:
                layer.merge(keep_base=keep_base)


def unmerge_adapter(pipe) -> None:
    """Take the merged updates out again (exactly, where merge kept the base weights)."""
    for model in _require(pipe).values():
        for _, layer in nblora_layers(model):
            if layer.merged:
                layer.unmerge()


def remove_adapter(pipe, merge: bool = False) -> None:
    """Put plain Linear layers back: the base model (``merge=False``) or base + update (``merge=True``)."""
    if not merge:
        unmerge_adapter(pipe)
    for model in _require(pipe).values():
        unload_nblora(model, merge=merge)
