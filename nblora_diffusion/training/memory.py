"""Peak accelerator memory of a training run, estimated without the accelerator and without weights
(``train_dreambooth.py --estimate_memory``).

The trainer's own step (``dreambooth_loss``, backward, gradient clipping, the optimizer step) runs on
fake tensors (``FakeTensorMode``: shapes, dtypes and strides, no data) of the real-size models built from
their configs on the meta device, so SDXL costs seconds on a laptop. ``LiveBytes``, a dispatch mode,
counts the bytes of every storage an op creates and frees them through weakref finalizers; the peak is
taken per phase: prompt encoding, latent caching (one image), and two training steps (the first creates the
optimizer state, the second runs with it).

On a CUDA target three things of the GPU are emulated, since the fake tensors live on the CPU:
- autocast follows CUDA's policy (``_CUDA_AUTOCAST``, torch's autocast_mode.h): GroupNorm, LayerNorm,
  softmax, nearest upsampling and friends run in float32 under fp16/bf16, which CPU autocast does not do;
- attention is a fused kernel (flash / memory-efficient SDPA): outputs and a float32 log-sum-exp forward,
  an fp32 accumulator of q's size in backward, never the N×N matrix of the CPU's math path;
- every allocation is rounded up to the caching allocator's 512-byte blocks.
What it counts is ``torch.cuda.max_memory_allocated``: the CUDA context (~0.3-0.5 GB), cuBLAS/cuDNN
workspaces and allocator fragmentation (``max_memory_reserved``) come on top. Validation images and class
image generation are inference passes that it does not count.

Here: the phases (``simulate``) and the two ways to run them (``estimate_memory`` on fake tensors,
``measure_cpu_memory`` on real ones). The weightless models and the optimizer stand-ins are in
``training.stand_ins``, the GPU emulation in ``training.cuda_emulation``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import stand_ins
from .caching import VAELatents, _scaled_sample
from .config import TrainConfig
from .cuda_emulation import CUDA_BLOCK, LiveBytes, cuda_autocast_policy, cuda_kernels
from .losses import dreambooth_loss
from .methods import TEXT_COMPONENTS, add_adapters
from .stand_ins import KNOWN_MODELS, fake_pipeline, model_folder
from .text import PromptEncoder

GiB = 2**30
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by --mixed_precision


# -- the simulation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on the accelerator, overall and per phase, with what stays resident."""

    peak: int
    phases: dict[str, int]  # phase -> peak bytes during it
    weights: dict[str, int]  # component -> bytes of its frozen weights on the device during training
    trainable: int  # adapter parameters (float32)
    device: str

    def report(self, title: str = "") -> str:
        def gb(n: int) -> str:
            return f"{n / GiB:6.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:6.1f} MiB"

        lines = [
            f"expected peak {self.device} memory{' of ' + title if title else ''}: {gb(self.peak).strip()}"
        ]
        lines += [f"  {name:<22}{gb(n)}" for name, n in self.phases.items()]
        lines += ["  resident while training:"]
        lines += [f"    {name:<20}{gb(n)}" for name, n in self.weights.items()]
        lines += [f"    {'adapter parameters':<20}{gb(self.trainable)}"]
        if self.device == "cuda":
            lines += [
                "  (as torch.cuda.max_memory_allocated: the CUDA context and fragmentation come on top)"
            ]
        return "\n".join(lines)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def simulate(
    config: TrainConfig, pipe, setup, resolution: int, tracker: LiveBytes, autocast: Callable
) -> MemoryEstimate:
    """The trainer's phases on ``pipe``'s modules with ``setup``'s adapters (fake or real tensors),
    counted by ``tracker``.

    ``autocast`` is a context factory for the UNet's (and trained encoders') forwards: what accelerate
    wraps them in under --mixed_precision. Returns the peaks; ``tracker`` must not be entered yet.
    """
    from diffusers import DDPMScheduler

    from ..diffusion import is_sdxl

    cfg = config
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    sdxl = is_sdxl(pipe)
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for name, model in setup.models.items():
            if name != "unet":
                model.gradient_checkpointing_enable()
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    phases: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(name: str):
        tracker.peak = tracker.live
        yield
        phases[name] = tracker.peak

    tracker.track([t for m in (pipe.unet, pipe.vae, *encoders) for t in _module_tensors(m)])
    with tracker:
        prompts = PromptEncoder(
            pipe, sdxl, "a photo of sks dog", "a photo of dog" if cfg.with_prior_preservation else None,
            train_text=cfg.train_text_encoder,
        )  # fmt: skip
        if not cfg.train_text_encoder:
            with phase("prompt encoding"):
                prompts.precompute()
        per_step = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
        h = resolution // (2 ** (len(pipe.vae.config.block_out_channels) - 1))
        channels = pipe.vae.config.latent_channels
        if cfg.cache_latents:
            with phase("latent caching"), torch.no_grad():
                pixels = torch.empty(1, 3, resolution, resolution)
                pipe.vae.encode(pixels).latent_dist.parameters.float()
                del pixels

            def latents_of(batch):  # a batch's cached moments, moved to the device
                return _scaled_sample(torch.empty(len(batch["latent_keys"]), 2 * channels, h, h), pipe.vae)

            tracker.forget(_module_tensors(pipe.vae))  # offloaded to the CPU
        else:
            latents_of = VAELatents(pipe.vae)
        if cfg.cache_text_embeddings:
            for e in encoders:
                tracker.forget(_module_tensors(e))
        optimizer = stand_ins.optimizer(cfg, setup.trainable_parameters())
        scheduler = DDPMScheduler.from_config(pipe.scheduler_config)
        unet = pipe.unet
        unet.train()

        def unet_fn(*args, **kwargs):  # accelerate's wrapper: autocast, outputs back in float32
            with autocast():
                out = unet(*args, **kwargs)
            return types.SimpleNamespace(sample=out.sample.float())

        if cfg.train_text_encoder:
            prompts.encoders = [_Autocast(e, autocast) for e in prompts.encoders]
        for step in (1, 2):
            with phase(f"training step {step}"):
                batch = {
                    "pixel_values": torch.empty(per_step, 3, resolution, resolution).uniform_(-1, 1),
                    "num_instance": cfg.train_batch_size,
                    "original_size": torch.full((per_step, 2), resolution),
                    "crop_top_left": torch.zeros(per_step, 2, dtype=torch.long),
                    "latent_keys": [("instance", 0, False)] * per_step,
                }
                loss = dreambooth_loss(
                    batch, unet_fn, latents_of=latents_of, noise_scheduler=scheduler, prompts=prompts,
                    resolution=resolution, weight_dtype=weight_dtype, prior_loss_weight=cfg.prior_loss_weight,
                    snr_gamma=cfg.snr_gamma, noise_offset=cfg.noise_offset,
                )  # fmt: skip
                loss.backward()
                del loss, batch
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(
                        setup.trainable_parameters(), cfg.max_grad_norm, foreach=False
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    weights = {"unet": pipe.unet}
    if not cfg.cache_latents:
        weights["vae"] = pipe.vae
    if not cfg.cache_text_embeddings:
        weights.update(zip(TEXT_COMPONENTS, encoders, strict=False))
    trainable = set(map(id, setup.trainable_parameters()))
    frozen = {
        n: _storage_bytes(t for t in _module_tensors(m) if id(t) not in trainable) for n, m in weights.items()
    }
    return MemoryEstimate(
        peak=max(phases.values()),
        phases=phases,
        weights=frozen,
        trainable=_storage_bytes(setup.trainable_parameters()),
        device="",
    )


class _Autocast:
    """A trained text encoder as accelerate prepares it: its forward under autocast."""

    def __init__(self, module: nn.Module, autocast: Callable) -> None:
        self.module, self.autocast, self.device = module, autocast, module.device

    def __call__(self, *args, **kwargs):
        with self.autocast():
            return self.module(*args, **kwargs)


def _cpu_autocast(config: TrainConfig) -> Callable:
    """What accelerate wraps the trained forwards in under --mixed_precision, as CPU autocast."""
    low = None if config.mixed_precision == "no" else WEIGHT_DTYPES[config.mixed_precision]

    def autocast():
        return torch.autocast("cpu", dtype=low) if low is not None else contextlib.nullcontext()

    return autocast


def _placeholder_bound(config: TrainConfig) -> TrainConfig:
    """A fixed δ: γ·‖W_base‖ needs weight values, and the bound's value does not change any memory."""
    return config.replace(norm_bound=config.norm_bound or 1.0, norm_bound_ratio=None)


def estimate_memory(config: TrainConfig, device: str = "cuda") -> MemoryEstimate:
    """Expected peak memory of training with ``config`` on ``device`` ("cuda", or "cpu" for the CPU's own
    kernels, which the tests measure for real), from the model's configs alone."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device!r}")
    folder = model_folder(config)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    config = _placeholder_bound(config)
    pipe, setup = fake_pipeline(config, folder, weight_dtype, mode)
    unet_cfg = pipe.unet.config
    resolution = config.resolution or unet_cfg.sample_size * 2 ** (
        len(pipe.vae.config.block_out_channels) - 1
    )
    kernels = cuda_kernels() if device == "cuda" else contextlib.nullcontext()
    with mode, kernels, torch.random.fork_rng(devices=[]):
        tracker = LiveBytes(CUDA_BLOCK if device == "cuda" else 1)
        result = simulate(config, pipe, setup, resolution, tracker, _cpu_autocast(config))
    return dataclasses.replace(result, device=device)


def measure_cpu_memory(config: TrainConfig) -> tuple[MemoryEstimate, int]:
    """The same phases on real CPU tensors of the real model (weights loaded), for validating the estimate:
    (the counter's result, the peak bytes that torch's profiler saw allocated, plus what was resident)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    from .. import diffusion

    if config.mixed_precision == "fp16":
        raise ValueError("measuring on the CPU needs --mixed_precision no or bf16")
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    loaded = diffusion.load_pipeline(config.pretrained_model_name_or_path, weight_dtype)
    torch.nn.Module.to(loaded.vae, dtype=torch.float32)
    names = ("unet", "vae", "tokenizer", "tokenizer_2", *TEXT_COMPONENTS)
    pipe = types.SimpleNamespace(
        **{n: getattr(loaded, n) for n in names if getattr(loaded, n, None) is not None},
        scheduler_config=dict(loaded.scheduler.config),
    )
    resolution = config.resolution or pipe.unet.config.sample_size * loaded.vae_scale_factor
    config = _placeholder_bound(config)
    setup = add_adapters(pipe, config)
    models = [pipe.unet, pipe.vae, *(getattr(pipe, n) for n in TEXT_COMPONENTS if hasattr(pipe, n))]
    resident = _storage_bytes(t for m in models for t in _module_tensors(m))  # weights and adapters
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        result = simulate(config, pipe, setup, resolution, LiveBytes(), _cpu_autocast(config))
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return dataclasses.replace(result, device="cpu"), resident + peak


__all__ = [  # with what cuda_emulation and stand_ins hold, re-exported for the estimate's users
    "CUDA_BLOCK",
    "GiB",
    "KNOWN_MODELS",
    "LiveBytes",
    "MemoryEstimate",
    "WEIGHT_DTYPES",
    "cuda_autocast_policy",
    "cuda_kernels",
    "estimate_memory",
    "fake_pipeline",
    "measure_cpu_memory",
    "model_folder",
    "simulate",
]
