"""The field's baselines to a norm bound: base-model output preservation and kohya's max-norm rescaling.

Output preservation (``--output_preservation_weight``, ai-toolkit's ``diff_output_preservation``,
OneTrainer's prior prediction): on the class prompt the adapted UNet's prediction is pulled towards
what the frozen base model predicts for the same noisy latents and timesteps, so the adapter changes
the class as little as it can while it learns the subject on the instance prompt.

Max-norm rescaling (``--scale_weight_norms``, kohya sd-scripts' ``max_norm_regularization``): after
each optimizer step every LoRA pair is rescaled so that ‖s·B·A‖_F ≤ MAX, B and A each by √ratio.
Unlike NB-LoRA's bound it acts after the step, on the Frobenius norm only, and AdamW's moments never
see it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..core import nblora_layers
from .adapters import AdapterSetup


@contextlib.contextmanager
def base_model(setup: AdapterSetup) -> Iterator[None]:
    """Inside: the UNet computes the frozen base model (adapter off), restored on exit.

    NB-LoRA: scale 0, which skips the adapter branch (the base model exactly). LoRA/DoRA: PEFT's
    disabled adapters. PiSSA moved its principal part out of the base weight (W = W_res + B₀A₀), so
    the base model is the adapter at its initial factors, swapped in for the duration.
    """
    unet = setup.models["unet"]
    if setup.kind == "nblora":
        layers = [layer for _, layer in nblora_layers(unet)]
        scales = [layer.scale for layer in layers]
        for layer in layers:
            layer.scale = 0.0
        try:
            yield
        finally:
            for layer, s in zip(layers, scales, strict=True):
                layer.scale = s
        return
    if setup.kind == "pissa":
        pairs = list(_pissa_pairs(unet, setup.pissa_init["unet"]))
        saved = [t.detach().clone() for _, t, _ in pairs]
        with torch.no_grad():
            for _, t, t0 in pairs:
                t.copy_(t0)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, t, _), s in zip(pairs, saved, strict=True):
                    t.copy_(s)
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def _pissa_pairs(unet: nn.Module, init: dict[str, torch.Tensor]):
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            for side in ("lora_A", "lora_B"):
                yield name, getattr(module, side)["default"].weight, init[f"{name}.{side}.weight"]


@torch.no_grad()
def base_prediction(
    setup: AdapterSetup, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, **kwargs
) -> torch.Tensor:
    """The frozen base model's prediction ε_base(x_t, t, c): the preservation target (no graph).

    Runs on the plain UNet module (not the accelerate-wrapped or compiled one). Call it before the
    adapted forwards of the step: PiSSA's factor swap must not touch a tensor autograd has saved.
    """
    with base_model(setup):
        return setup.models["unet"](noisy, timesteps, embeds, **kwargs).sample  # (B, C, h, w)


@torch.no_grad()
def scale_weight_norms(setup: AdapterSetup, max_norm: float) -> tuple[int, float]:
    """Rescale every LoRA pair of the trained models so that ‖s·B·A‖_F ≤ ``max_norm``.

    Returns (pairs rescaled, largest norm before rescaling). B and A each scale by √(MAX/‖·‖), which
    keeps their balance as kohya's rule does.
    """
    if setup.kind != "lora":
        raise ValueError(f"--scale_weight_norms applies to --adapter lora, not {setup.kind}")
    scaled, largest = 0, 0.0
    for model in setup.models.values():
        for module in model.modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
                continue
            A, B = lora_a["default"].weight, module.lora_B["default"].weight  # (r, n), (m, r)
            norm = float(torch.linalg.matrix_norm((B.float() * module.scaling["default"]) @ A.float()))
            largest = max(largest, norm)
            if norm > max_norm:
                root = (max_norm / norm) ** 0.5
                A.mul_(root)
                B.mul_(root)
                scaled += 1
    return scaled, largest
