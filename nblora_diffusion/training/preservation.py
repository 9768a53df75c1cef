"""The field's baselines to a norm bound: base-model output preservation and kohya's max-norm rescaling.

Output preservation (``--output_preservation_weight``, ai-toolkit's ``diff_output_preservation``,
OneTrainer's prior prediction): on the class prompt the adapted UNet's prediction is pulled towards
what the frozen base model predicts for the same noisy latents and timesteps, so the adapter changes
the class as little as it can while it learns the subject on the instance prompt.

Max-norm rescaling (``--scale_weight_norms``, kohya sd-scripts' ``max_norm_regularization``): after
each optimizer step every LoRA pair is rescaled so that ‖s·B·A‖_F ≤ MAX, B and A each by √ratio.
Unlike NB-LoRA's bound it acts after the step, on the Frobenius norm only, and AdamW's moments never
see it.

How each adapter kind switches itself off or rescales is its own operation (``methods``: ``base_model``,
``limit_norms``); this module holds what the trainer calls.
"""

from __future__ import annotations

import torch

from .methods import AdapterSetup


@torch.no_grad()
def base_prediction(
    setup: AdapterSetup, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, **kwargs
) -> torch.Tensor:
    """The frozen base model's prediction ε_base(x_t, t, c): the preservation target (no graph).

    Runs on the plain UNet module (not the accelerate-wrapped or compiled one), with the adapter off:
    NB-LoRA at scale 0, PEFT's adapters disabled, PiSSA at its initial factors. Call it before the
    adapted forwards of the step: PiSSA's factor swap must not touch a tensor autograd has saved.
    """
    with setup.base_model():
        return setup.models["unet"](noisy, timesteps, embeds, **kwargs).sample  # (B, C, h, w)


def scale_weight_norms(setup: AdapterSetup, max_norm: float) -> tuple[int, float]:
    """Rescale every LoRA pair of the trained models so that ‖s·B·A‖_F ≤ ``max_norm`` (LoRA only).

    Returns (pairs rescaled, largest norm before rescaling). B and A each scale by √(MAX/‖·‖), which
    keeps their balance as kohya's rule does.
    """
    return setup.limit_norms(max_norm)
