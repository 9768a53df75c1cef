"""Helpers shared by the Stable Diffusion tests: a fixed-seed generation and a 'trained' adapter."""

from __future__ import annotations

import torch

PROMPT = "a photo of sks dog"


def images(pipe, steps: int = 2) -> torch.Tensor:
    """Images (N, 3, H, W) in float32 from a fixed seed."""
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, generator=gen, output_type="pt").images.float()


def assert_images_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Images of the same pipeline computed two ways (e.g. merged vs unmerged) in ``dtype``: the mean
    error within 16 ulps of the dtype, the worst pixel within 128 ulps (at most 0.25). Measured over
    seeds on the tiny SD: mean ≈ 1 ulp (fp16/bf16) and 5 ulps (fp32), worst pixel ≈ 12 and 56 ulps."""
    eps = torch.finfo(dtype).eps
    err = (actual.float() - expected.float()).abs()
    assert float(err.mean()) <= 16 * eps, f"mean error {float(err.mean()):.3g} > 16 ulps of {dtype}"
    assert float(err.max()) <= min(128 * eps, 0.25), f"max error {float(err.max()):.3g} > 128 ulps of {dtype}"


def perturb(pipe, seed: int = 0) -> None:
    """Random adapter parameters (a 'trained' adapter) with the update still inside its bound."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            for name, p in model.named_parameters() if model is not None else ():
                if name.endswith(("nblora_B", "nblora_d", "nblora_s")):
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
