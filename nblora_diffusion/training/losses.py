"""The DreamBooth denoising loss with optional prior preservation and Min-SNR weighting."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._deprecated import keyword_only_since
from .text import PromptEncoder, time_ids


@keyword_only_since(
    2,
    (
        "latents_of",
        "noise_scheduler",
        "prompts",
        "resolution",
        "weight_dtype",
        "prior_loss_weight",
        "snr_gamma",
    ),
)
def dreambooth_loss(
    batch: dict,
    unet,
    *,
    latents_of: Callable[[dict], torch.Tensor],
    noise_scheduler,
    prompts: PromptEncoder,
    resolution: int,
    weight_dtype: torch.dtype,
    prior_loss_weight: float = 1.0,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    output_preservation_weight: float = 0.0,
    adapter_setup=None,
) -> torch.Tensor:
    """Mean noise-prediction error on the instance half plus ``prior_loss_weight`` × the class half.

    The batch holds instance examples first and class examples after them (``collate``);
    ``latents_of(batch)`` gives their scaled VAE latents (``caching.VAELatents`` or ``LatentCache``).
    Every random draw (VAE posterior sample, noise, noise offset, timesteps) comes from the global RNG,
    which checkpoints save and restore. ``noise_offset`` adds offset·randn(B, C, 1, 1) to the noise (a
    per-channel shift that lets the model learn overall brightness); 0 draws nothing.
    ``output_preservation_weight`` > 0 adds that weight × ‖ε_θ − ε_base‖² on the instance half's noisy
    latents under the class prompt (``preservation``; ``adapter_setup`` switches the adapter off).
    """
    latents = latents_of(batch).to(weight_dtype)  # (B, 4, S/8, S/8)
    device = latents.device
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), device=device, dtype=latents.dtype
        )
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    n_inst = int(batch["num_instance"])
    embeds, pooled = prompts(n_inst, bsz - n_inst)
    kwargs = {}
    if pooled is not None:  # SDXL: pooled text embedding and size/crop micro-conditioning
        ids = time_ids(batch["original_size"], batch["crop_top_left"], resolution)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": pooled.to(weight_dtype),
            "time_ids": ids.to(device, weight_dtype),
        }
    if output_preservation_weight:  # the base target first: see preservation.base_prediction
        from .preservation import base_prediction

        keep = {k: {n: v[:n_inst] for n, v in d.items()} for k, d in kwargs.items()}
        class_embeds, class_pooled = prompts(0, n_inst)
        if class_pooled is not None:
            keep["added_cond_kwargs"]["text_embeds"] = class_pooled.to(weight_dtype)
        keep_args = (noisy[:n_inst], timesteps[:n_inst], class_embeds.to(weight_dtype))
        base = base_prediction(adapter_setup, *keep_args, **keep)
    pred = unet(noisy, timesteps, embeds.to(weight_dtype), **kwargs).sample

    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported scheduler prediction_type {kind!r} (expected epsilon or v_prediction)")
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        # Min-SNR-γ (Hang et al. 2023): weight min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        per_example = per_example * weight
    loss = per_example[:n_inst].mean()
    if bsz > n_inst:
        loss = loss + prior_loss_weight * per_example[n_inst:].mean()
    if output_preservation_weight:
        kept = unet(*keep_args, **keep).sample
        loss = loss + output_preservation_weight * F.mse_loss(kept.float(), base.float())
    return loss
