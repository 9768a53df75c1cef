"""The trainer's memory savers change nothing they should not: cached latents and text embeddings train the
same adapter as encoding every step, another VAE is the one used, noise offset 0 is no offset, and the
optimizer choice fails in one line when its package is missing."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from train_helpers import DOG, tiny_config

from nblora_diffusion import diffusion
from nblora_diffusion.testing import make_tiny_sd, tiny_sd_path
from nblora_diffusion.testing.ldm_layout import vae_to_ldm
from nblora_diffusion.training import TrainConfig, build_parser, caching, train
from nblora_diffusion.training import loop as train_loop
from nblora_diffusion.training import setup as train_setup
from nblora_diffusion.training.data import DreamBoothDataset, collate, load_photos
from nblora_diffusion.training.losses import dreambooth_loss
from nblora_diffusion.training.optim import optimizer_class

CPU = types.SimpleNamespace(device=torch.device("cpu"))  # what load_base needs of an Accelerator
FP32_TOL = 10 * torch.finfo(torch.float32).eps  # a batched VAE encoding vs one image at a time


def config(out: Path, **changes) -> TrainConfig:
    defaults = dict(
        train_batch_size=2,
        random_flip=True,
        max_train_steps=3,
        checkpointing_steps=3,
        learning_rate=5e-2,
        norm_bound=0.5,
    )
    return tiny_config(out, **{**defaults, **changes})


def trained(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    result = train(cfg)
    return load_file(
        str(result.output_dir / f"checkpoint-{cfg.max_train_steps}" / "training_state.safetensors")
    )


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def uncached(tmp_path_factory) -> dict[str, torch.Tensor]:
    return trained(config(tmp_path_factory.mktemp("uncached") / "out"))


def prior(root: Path, **changes) -> TrainConfig:
    """Prior preservation; the class images are generated from the run's seed, so every run gets the same."""
    return config(
        root / "out",
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(root / "classes"),
        num_class_images=2,
        class_inference_steps=2,
        **changes,
    )


def test_cached_latents_train_the_same_adapter_as_encoding_every_step(uncached, tmp_path, monkeypatch):
    built = []
    original = caching.LatentCache.build.__func__
    monkeypatch.setattr(
        caching.LatentCache,
        "build",
        classmethod(lambda cls, *a, **k: built.append(original(cls, *a, **k)) or built[-1]),
    )
    cached = trained(config(tmp_path / "out", cache_latents=True))
    assert len(built) == 1 and len(built[0].moments) == 2 * len(list(DOG.iterdir())), (
        "both flips of each photo"
    )
    init = trained(config(tmp_path / "zero", max_train_steps=1, checkpointing_steps=1, learning_rate=1e-12))
    moved = max(float((uncached[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3, "training moved nothing: the comparison would be vacuous"
    assert_same(cached, uncached)  # both encode one image at a time: the same numbers, bit for bit


def test_cached_latents_with_prior_preservation_cover_the_class_images(tmp_path):
    uncached = trained(prior(tmp_path / "plain"))
    cached = trained(prior(tmp_path / "cached", cache_latents=True))
    assert_same(cached, uncached)


def test_cached_latents_sample_the_posterior_as_the_vae_does():
    """Same global RNG state -> the cached sample equals the VAE's own ``latent_dist.sample()``."""
    pipe = diffusion.load_pipeline(tiny_sd_path())
    dataset = DreamBoothDataset(load_photos(DOG), 32, random_flip=True, seed=3)
    batch = collate([dataset[i] for i in range(3)])
    cache = caching.LatentCache.build(pipe.vae, dataset, torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():
        direct = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample() * pipe.vae.config.scaling_factor
    torch.manual_seed(1)
    assert torch.allclose(cache(batch), direct, atol=FP32_TOL)
    torch.manual_seed(1)
    assert torch.allclose(caching.VAELatents(pipe.vae)(batch), direct, atol=FP32_TOL)


def test_cached_latents_refuse_random_crops_of_a_non_square_photo(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (48 + 16 * (i == 1), 48), (40 * i, 90, 200)).save(photos / f"{i}.png")
    out = tmp_path / "out"
    cfg = config(out, instance_data_dir=str(photos), cache_latents=True)
    with pytest.raises(
        ValueError, match=r"--cache_latents with random crops: 1\.png \(64x48\).*--center_crop"
    ) as e:
        train(cfg)
    assert "\n" not in str(e.value) and not out.exists(), "nothing may be written for bad input"
    assert train(cfg.replace(center_crop=True, max_train_steps=1, checkpointing_steps=1)).final_step == 1


def test_cached_text_embeddings_equal_encoding_every_step(uncached, tmp_path, monkeypatch):
    from transformers import CLIPTextModel

    calls, moved, onloaded = [], [], []
    pipe_encoders = []
    real_forward = CLIPTextModel.forward

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real_forward(self, *args, **kwargs)

    real_onloaded = caching.onloaded

    def spy_onloaded(modules, device):
        onloaded.append((list(modules), len(calls)))
        return real_onloaded(modules, device)

    monkeypatch.setattr(CLIPTextModel, "forward", counted)
    monkeypatch.setattr(train_loop, "offload", lambda modules, device: moved.append(list(modules)))
    monkeypatch.setattr(train_loop, "onloaded", spy_onloaded)
    real_build = train_loop.build

    def spy_build(run, *args, **kwargs):
        pipe_encoders.append((run.pipe.text_encoder, run.pipe.vae))
        return real_build(run, *args, **kwargs)

    monkeypatch.setattr(train_loop, "build", spy_build)
    cfg = config(tmp_path / "out", cache_text_embeddings=True, cache_latents=True)
    cached = trained(cfg.replace(validation_prompt="a photo of sks dog", validation_steps=3,
                                 num_validation_images=1, validation_inference_steps=1))  # fmt: skip
    encoder, vae = pipe_encoders[0]
    assert moved == [[encoder, vae]], "the text encoder and the VAE leave the accelerator once cached"
    assert onloaded == [([encoder, vae], 1)], "encoded once for all 3 steps; validation brings them back"
    assert len(calls) > 1, "validation encodes its prompt with the encoder brought back"
    assert_same(cached, uncached)


def test_cached_text_embeddings_need_frozen_text_encoders(tmp_path):
    with pytest.raises(ValueError, match="--cache_text_embeddings needs frozen text encoders"):
        config(tmp_path, cache_text_embeddings=True, train_text_encoder=True)


def test_offload_moves_modules_to_the_cpu_and_onloaded_brings_them_back(monkeypatch):
    moves = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, device: moves.append((self, str(device))))
    module, gpu = torch.nn.Linear(2, 2), torch.device("cuda")  # no GPU needed: the moves are recorded
    caching.offload([module], gpu)
    with caching.onloaded([module], gpu):
        assert moves == [(module, "cpu"), (module, "cuda")]
    assert moves[-1] == (module, "cpu")
    moves.clear()
    caching.offload([module], torch.device("cpu"))  # a CPU run: nothing to move
    with caching.onloaded([module], torch.device("cpu")):
        pass
    assert moves == []


# -- another VAE ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_vae(tmp_path_factory) -> tuple[Path, Path]:
    """The VAE of a tiny model with other weights: as a folder and as one LDM-layout .safetensors file."""
    root = tmp_path_factory.mktemp("vae")
    folder = make_tiny_sd(root / "seed1", seed=1) / "vae"
    vae = diffusion.load_pipeline(folder.parent).vae
    single = root / "vae-ft.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}, str(single))
    return folder, single


def _latents(vae) -> torch.Tensor:
    batch = collate([DreamBoothDataset(load_photos(DOG), 32, center_crop=True)[0]])
    torch.manual_seed(0)
    return caching.VAELatents(vae)(batch)


@pytest.mark.parametrize("form", ["folder", "pipeline folder", "single file"])
def test_pretrained_vae_is_the_one_used(tmp_path, other_vae, form):
    folder, single = other_vae
    path = {"folder": folder, "pipeline folder": folder.parent, "single file": single}[form]
    cfg = config(tmp_path, pretrained_vae_model_name_or_path=str(path))
    pipe, _, _ = train_setup.load_base(cfg, CPU)
    reference = diffusion.load_pipeline(folder.parent).vae
    ours, theirs = pipe.vae.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert pipe.vae.dtype == torch.float32
    base = diffusion.load_pipeline(tiny_sd_path()).vae
    assert (_latents(pipe.vae) - _latents(base)).abs().max() > 1e-3, "another VAE must change the latents"


def test_pretrained_vae_trains_and_bad_vaes_are_one_line_errors(tmp_path, other_vae):
    folder, _ = other_vae
    assert train(config(tmp_path / "ok", pretrained_vae_model_name_or_path=str(folder))).final_step == 3
    (tmp_path / "empty").mkdir()
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    cases = {
        str(tmp_path / "missing.safetensors"): "file not found",
        str(tmp_path / "empty"): "not a diffusers VAE",
        str(tmp_path / "vae.ckpt"): "must be .safetensors",
        str(DOG / "00.jpg"): "expected a VAE folder",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as e:
            train_setup.load_base(config(tmp_path, pretrained_vae_model_name_or_path=path), CPU)
        assert "\n" not in str(e.value) and "--pretrained_vae_model_name_or_path" in str(e.value)


# -- noise offset --------------------------------------------------------------------------------------
def test_noise_offset_zero_is_no_offset_and_an_offset_shifts_each_channel(uncached, tmp_path):
    assert all(torch.equal(v, uncached[k]) for k, v in trained(config(tmp_path, noise_offset=0.0)).items())
    pipe = diffusion.load_pipeline(tiny_sd_path())
    noises = []

    def unet(noisy, timesteps, embeds, **kwargs):  # records the noise the loss targets (ε-prediction)
        noises.append(noisy)
        return types.SimpleNamespace(sample=torch.zeros_like(noisy))

    from diffusers import DDPMScheduler

    from nblora_diffusion.training.text import PromptEncoder

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = PromptEncoder(pipe, False, "a photo of sks dog", None, train_text=False)
    batch = collate([DreamBoothDataset(load_photos(DOG), 32)[i] for i in range(4)])
    latents = torch.zeros(4, 4, 4, 4)  # noisy = sqrt(1 - ᾱ) · noise: the loss equals the noise's mean square
    inputs = dict(
        latents_of=lambda b: latents,
        noise_scheduler=scheduler,
        prompts=prompts,
        resolution=32,
        weight_dtype=torch.float32,
    )
    losses = {}
    for offset in (0.0, 1.0):
        torch.manual_seed(0)
        losses[offset] = dreambooth_loss(batch, unet, noise_offset=offset, **inputs)
    torch.manual_seed(0)
    default = dreambooth_loss(batch, unet, **inputs)
    assert torch.equal(default, losses[0.0])
    assert losses[1.0] > 1.5 * losses[0.0], "an offset of 1 adds a unit-variance shift per (example, channel)"


def test_noise_offset_must_be_a_finite_non_negative_number(tmp_path):
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="--noise_offset must be a finite number >= 0"):
            config(tmp_path, noise_offset=bad)


# -- optimizers ------------------------------------------------------------------------------------------
def test_bad_optimizer_name_is_a_one_line_error(tmp_path):
    names = "adamw, adamw_fused, adamw8bit, prodigy"
    with pytest.raises(ValueError, match=rf"--optimizer must be one of {names}, got 'sgd'"):
        config(tmp_path, optimizer="sgd")
    with pytest.raises(ValueError, match="invalid choice") as e:
        build_parser().parse_args(["--optimizer", "lion"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("name", "module", "package"),
    [("adamw8bit", "bitsandbytes", "bitsandbytes"), ("prodigy", "prodigyopt", "prodigyopt")],
)
def test_missing_optimizer_package_is_a_one_line_error_before_anything_is_written(
    tmp_path, monkeypatch, name, module, package
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    monkeypatch.delitem(sys.modules, f"{module}.optim", raising=False)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"--optimizer {name} needs {package}: pip install {package}") as e:
        train(config(out, optimizer=name))
    assert "\n" not in str(e.value) and not out.exists()


def test_use_8bit_adam_is_an_alias_of_adamw8bit(tmp_path):
    assert config(tmp_path, use_8bit_adam=True).optimizer == "adamw8bit"
    assert config(tmp_path, use_8bit_adam=True, optimizer="adamw8bit").optimizer == "adamw8bit"
    with pytest.raises(ValueError, match="--use_8bit_adam contradicts --optimizer prodigy"):
        config(tmp_path, use_8bit_adam=True, optimizer="prodigy")


def test_adamw8bit_is_bitsandbytes_adamw8bit_with_the_runs_hyperparameters(tmp_path, monkeypatch):
    made = []

    class AdamW8bit(torch.optim.AdamW):  # a stand-in: bitsandbytes' kernels need a GPU
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, **kwargs)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.ModuleType("bitsandbytes.optim")
    fake.optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", fake.optim)
    assert optimizer_class("adamw8bit") is AdamW8bit
    result = train(config(tmp_path / "out", use_8bit_adam=True, max_train_steps=1, checkpointing_steps=1))
    assert result.final_step == 1
    assert made == [{"lr": 5e-2, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}]


def test_adamw_fused_is_torchs_fused_kernel_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    calls = []
    kernel = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    cfg = config(tmp_path / "out", optimizer="adamw_fused", max_train_steps=2, checkpointing_steps=1)
    fused = trained(cfg)
    assert len(calls) == cfg.max_train_steps  # one fused kernel call per step: every adapter tensor in it
    split = cfg.replace(output_dir=str(tmp_path / "split"))
    one_step = trained(split.replace(max_train_steps=1))
    assert_same(trained(split.replace(resume_from_checkpoint="latest")), fused)  # resumed to step 2
    # the loop's first update from the same gradients, up to float32 rounding (later steps are not
    # compared: where a gradient is ≈ eps, Adam amplifies a rounding difference to a sizeable share of lr)
    loop = trained(split.replace(output_dir=str(tmp_path / "loop"), optimizer="adamw", max_train_steps=1))
    assert one_step.keys() == loop.keys()
    eps = torch.finfo(torch.float32).eps
    for k in one_step:
        torch.testing.assert_close(one_step[k], loop[k], rtol=8 * eps, atol=8 * eps * cfg.learning_rate)
    made, plain = (
        train_setup.make_optimizer(c, [torch.nn.Parameter(torch.zeros(2))], 1)
        for c in (cfg, cfg.replace(optimizer="adamw"))
    )
    assert type(made) is torch.optim.AdamW and made.defaults["fused"] is True
    assert {**made.defaults, "fused": None} == plain.defaults  # the run's betas, eps, weight decay


def test_prodigy_trains(tmp_path):
    pytest.importorskip("prodigyopt")
    out = tmp_path / "out"
    cfg = config(out, optimizer="prodigy", learning_rate=1.0, max_train_steps=2, checkpointing_steps=2)
    tensors = trained(cfg)
    init = trained(cfg.replace(output_dir=str(tmp_path / "init"), max_train_steps=1, learning_rate=1e-12,
                               checkpointing_steps=1))  # fmt: skip
    assert any(not torch.equal(tensors[k], init[k]) for k in tensors)
