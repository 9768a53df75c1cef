"""The field's baselines to a norm bound: base-model output preservation and kohya's max-norm rescaling."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_config

from nblora_diffusion import diffusion
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.training import TrainConfig, train
from nblora_diffusion.training.losses import dreambooth_loss
from nblora_diffusion.training.methods import add_adapters
from nblora_diffusion.training.preservation import base_prediction, scale_weight_norms
from nblora_diffusion.training.text import PromptEncoder

KINDS = ("nblora", "lora", "dora", "pissa")


def config(out: Path, **changes) -> TrainConfig:
    defaults = dict(
        class_prompt="a photo of dog",
        max_train_steps=3,
        checkpointing_steps=1000,
        rank=4,
    )
    return tiny_config(out, **{**defaults, **changes})


def adapted_pipe(kind: str, seed: int = 0):
    """(pipe with a non-zero adapter of ``kind``, its setup, a copy of the UNet before the adapter)."""
    pipe = diffusion.load_pipeline(tiny_sd_path())
    reference = copy.deepcopy(pipe.unet)
    cfg = config(Path("unused"), adapter=kind, **({"norm_bound": 2.0} if kind == "nblora" else {}))
    setup = add_adapters(pipe, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every adapter away from its (often zero-update) initial point
        for p in setup.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return pipe, setup, reference


def inputs(pipe, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    noisy = torch.randn(2, c.in_channels, 8, 8, generator=gen)
    embeds = torch.randn(2, 77, c.cross_attention_dim, generator=gen)
    return noisy, torch.tensor([10, 700]), embeds


@pytest.mark.parametrize("kind", KINDS)
def test_preservation_target_is_the_base_models_prediction_for_every_adapter_kind(kind):
    pipe, setup, reference = adapted_pipe(kind)
    noisy, t, embeds = inputs(pipe)
    with torch.no_grad():
        before = pipe.unet(noisy, t, embeds).sample
        want = reference(noisy, t, embeds).sample
    assert (before - want).abs().max() > 1e-3  # the adapter changes the output: the check is not vacuous
    got = base_prediction(setup, noisy, t, embeds)
    tol = 100 * want.numel() ** 0.5 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    with torch.no_grad():  # the adapter is back afterwards, exactly
        assert torch.equal(pipe.unet(noisy, t, embeds).sample, before)


@pytest.mark.parametrize("kind", ("nblora", "pissa"))
def test_preservation_term_is_weight_times_distance_to_the_base_on_the_class_prompt(kind):
    pipe, setup, reference = adapted_pipe(kind)
    prompts = PromptEncoder(pipe, False, "a photo of sks dog", "a photo of dog", train_text=False)
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = diffusion.load_pipeline(tiny_sd_path()).scheduler
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler.config)
    batch = {"num_instance": 2}

    def loss(weight: float) -> torch.Tensor:
        torch.manual_seed(0)
        return dreambooth_loss(batch, pipe.unet, latents_of=lambda b: latents, noise_scheduler=scheduler,
                               prompts=prompts, resolution=32, weight_dtype=torch.float32,
                               output_preservation_weight=weight, adapter_setup=setup)  # fmt: skip

    plain, weighted = loss(0.0), loss(2.5)
    torch.manual_seed(0)  # the draws dreambooth_loss makes: noise, then timesteps
    noise = torch.randn_like(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (2,)).long()
    noisy = scheduler.add_noise(latents, noise, t)
    class_embeds = prompts(0, 2)[0]
    with torch.no_grad():
        term = torch.nn.functional.mse_loss(
            pipe.unet(noisy, t, class_embeds).sample, reference(noisy, t, class_embeds).sample
        )
    assert term > 1e-6
    torch.testing.assert_close(weighted - plain, 2.5 * term, rtol=1e-4, atol=1e-7)


def test_weight_zero_trains_the_same_adapter_as_no_preservation_and_a_weight_changes_it(tmp_path):
    train(config(tmp_path / "off", learning_rate=1e-2))
    train(config(tmp_path / "zero", learning_rate=1e-2, output_preservation_weight=0.0))
    train(config(tmp_path / "on", learning_rate=1e-2, output_preservation_weight=1.0))
    name = "pytorch_lora_weights.safetensors"
    off, zero, on = (load_file(tmp_path / d / name) for d in ("off", "zero", "on"))
    assert all(torch.equal(off[k], zero[k]) for k in off)
    assert any(not torch.equal(off[k], on[k]) for k in off)


def test_preservation_trains_pissa_whose_base_is_its_initial_factors(tmp_path):
    result = train(config(tmp_path / "pissa", adapter="pissa", output_preservation_weight=1.0))
    assert result.final_step == 3


def _pair_norms(weights: dict[str, torch.Tensor]) -> list[float]:
    """‖B A‖_F of every LoRA pair of a diffusers LoRA file (alpha = rank: scale 1)."""
    return [
        float(torch.linalg.matrix_norm(weights[k.replace("lora.down", "lora.up")] @ weights[k]))
        for k in weights
        if k.endswith("lora.down.weight")
    ]


def test_scale_weight_norms_bounds_every_pair_after_each_step_where_plain_lora_exceeds_it(tmp_path):
    name = "pytorch_lora_weights.safetensors"
    train(config(tmp_path / "free", adapter="lora", learning_rate=5e-2))
    free = _pair_norms(load_file(tmp_path / "free" / name))
    cap = 0.5 * max(free)
    assert sum(n > cap for n in free) >= 2  # the cap binds on several layers
    train(config(tmp_path / "capped", adapter="lora", learning_rate=5e-2, scale_weight_norms=cap))
    capped = _pair_norms(load_file(tmp_path / "capped" / name))
    assert len(capped) == len(free)
    assert max(capped) <= cap * (1 + 1e-5), (max(capped), cap)


def test_scale_weight_norms_rescales_both_factors_by_the_same_root():
    pipe, setup, _ = adapted_pipe("lora")
    layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    before = [
        (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
        for m in layers
    ]
    norms = [float(torch.linalg.matrix_norm(B @ A)) for A, B in before]
    cap = sorted(norms)[len(norms) // 2]
    scaled, largest = scale_weight_norms(setup, cap)
    assert scaled == sum(n > cap for n in norms) >= 1 and largest == pytest.approx(max(norms))
    for m, (A, B), n in zip(layers, before, norms, strict=True):
        A1, B1 = m.lora_A["default"].weight, m.lora_B["default"].weight
        root = min(1.0, (cap / n) ** 0.5)
        torch.testing.assert_close(A1, A * root)
        torch.testing.assert_close(B1, B * root)
        assert float(torch.linalg.matrix_norm(B1 @ A1)) <= cap * (1 + 1e-5)


def test_scale_weight_norms_refuses_other_adapters():
    with pytest.raises(ValueError, match="applies to --adapter lora, not nblora"):
        config(Path("x"), scale_weight_norms=1.0)
    with pytest.raises(ValueError, match="needs --class_prompt"):
        config(Path("x"), class_prompt=None, output_preservation_weight=1.0)
