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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .adapters import TEXT_COMPONENTS, add_adapters
from .caching import VAELatents, _scaled_sample
from .config import TrainConfig
from .losses import dreambooth_loss
from .text import PromptEncoder

GiB = 2**30
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes
# hub ids whose configs ship in diffusion/configs, so the estimate needs neither the hub nor the cache
KNOWN_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
    "stabilityai/stable-diffusion-2-1": "sd21-v",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive (each storage once, views share it) and their peak.

    ``track`` counts tensors made before the mode; every op output is counted when first seen and
    uncounted when its storage is freed (a weakref finalizer on the storage). ``forget`` uncounts tensors
    that leave the device (an offloaded VAE).
    """

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()
        self.round_to, self.live, self.peak = round_to, 0, 0
        self._sizes: dict[int, int] = {}

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        n = -(-storage.nbytes() // self.round_to) * self.round_to
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def track(self, tensors) -> None:
        for t in tensors:
            self._add(t)

    def forget(self, tensors) -> None:
        for t in tensors:
            self._free(t.untyped_storage()._cdata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


# -- CUDA's autocast policy on CPU tensors ------------------------------------------------------------
# aten/src/ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE.
# Only the ops without an AutocastCPU kernel of their own are registered (the CPU lists differ).
_CUDA_AUTOCAST = {
    "lower": (
        "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d.input",
        "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm",
        "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "linalg_multi_dot",
    ),
    "fp32": (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
        "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
        "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm",
        "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
        "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
        "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
        "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
        "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
        "_upsample_bicubic2d_aa",
    ),
    "fp32_set_opt_dtype": (
        "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
        "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
    ),
}  # fmt: skip
_NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast(x, dtype: torch.dtype):
    if _eligible(x):
        return x.to(dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def _overload(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _policy_kernel(op, policy: str) -> Callable:
    schema = op._schema.arguments
    dtype_at = next((i for i, a in enumerate(schema) if a.name == "dtype"), None)

    def kernel(*args, **kwargs):
        if policy in ("lower", "fp32"):
            to = torch.get_autocast_dtype("cpu") if policy == "lower" else torch.float32
            args, kwargs = _cast(args, to), {k: _cast(v, to) for k, v in kwargs.items()}
        elif _eligible(args[0]) and dtype_at is not None:  # compute and return float32, no input copy
            if schema[dtype_at].kwarg_only or len(args) <= dtype_at:
                if kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            elif args[dtype_at] is None:
                args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1 :])
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """CPU autocast casts as CUDA autocast does, while the context lasts (the registrations are removed)."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for policy, names in _CUDA_AUTOCAST.items():
            for name in names:
                try:
                    op = _overload(name)
                except AttributeError:  # an op this torch does not have
                    continue
                if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCPU"):
                    lib.impl(name, _policy_kernel(op, policy), "AutocastCPU")
        yield
    finally:
        lib._destroy()


class _FusedAttention(torch.autograd.Function):
    """The memory of CUDA's fused attention (flash / memory-efficient): the output and a float32
    log-sum-exp (B, H, N) forward, saved with q, k, v; backward adds a float32 accumulator of q's size
    and dq, dk, dv. Shapes only: used on fake tensors."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)  # (B, H, N, d_v)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, H, N)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del accumulator
        return dq, dk, dv


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if torch.is_autocast_enabled("cpu"):  # SDPA is a lower-precision op of CUDA autocast
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def cuda_kernels() -> Iterator[None]:
    """CUDA's autocast policy and fused attention for the models run inside."""
    import unittest.mock

    patch = unittest.mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa)
    with cuda_autocast_policy(), patch:
        yield


# -- optimizers that cannot run on fake tensors -----------------------------------------------------------
def _adamw8bit_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes' AdamW8bit: two uint8 states with a float32 absmax per 256-element block; tensors under
    4096 elements keep float32 states (its min_8bit_size)."""
    if p.numel() < 4096:
        return {
            "state1": torch.empty_like(p, dtype=torch.float32),
            "state2": torch.empty_like(p, dtype=torch.float32),
        }
    blocks = -(-p.numel() // 256)
    return {
        "state1": torch.empty_like(p, dtype=torch.uint8),
        "state2": torch.empty_like(p, dtype=torch.uint8),
        "absmax1": torch.empty(blocks, dtype=torch.float32, device=p.device),
        "absmax2": torch.empty(blocks, dtype=torch.float32, device=p.device),
    }


def _prodigy_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """prodigyopt's Prodigy: exp_avg, exp_avg_sq, s and the initial weights p0, all float32."""
    return {n: torch.empty_like(p, dtype=torch.float32) for n in ("exp_avg", "exp_avg_sq", "s", "p0")}


class _StateSizes(torch.optim.Optimizer):
    """Allocates an optimizer's state tensors at its first step and a float32 update per tensor each step;
    no math (bitsandbytes needs a GPU, Prodigy reads tensor values with .item())."""

    def __init__(self, params, state: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
        super().__init__(params, {})
        self._make = state

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p] = self._make(p)
                p.add_(torch.zeros_like(p, dtype=torch.float32).to(p.dtype))


def _optimizer(config: TrainConfig, params: list) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        return _StateSizes(params, _adamw8bit_state)
    if config.optimizer == "prodigy":
        return _StateSizes(params, _prodigy_state)
    return torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.adam_weight_decay, foreach=False
    )


# -- the models -----------------------------------------------------------------------------------------
def model_folder(config: TrainConfig) -> Path:
    """The configs the estimate builds the models from: --base_model_config (a shipped skeleton or a
    folder), a local diffusers folder, the skeleton a single file's keys show, or a known hub id."""
    from ..diffusion import single_file

    name = config.base_model_config or config.pretrained_model_name_or_path
    name = KNOWN_MODELS.get(str(name), str(name))
    if name in single_file.SKELETONS:
        return single_file.CONFIGS / name
    path = Path(name).expanduser()
    if path.is_dir() and (path / "unet" / "config.json").is_file():
        return path
    if path.is_file():
        ckpt = single_file.read_checkpoint(path, allow_ckpt=config.allow_ckpt)
        arch = single_file.checkpoint_architecture(ckpt)
        return single_file.CONFIGS / single_file.skeleton_for(arch, single_file.prediction_type(ckpt, arch))
    raise ValueError(
        f"--estimate_memory needs the configs of {name!r}: pass a local diffusers folder, a single file, or "
        f"--base_model_config {'|'.join(single_file.SKELETONS)}"
    )


class _Ids:
    """A tokenizer stand-in: the estimate needs the shape of the token ids (P, L), not the tokens."""

    def __init__(self, length: int) -> None:
        self.model_max_length = length

    def __call__(self, prompts, **kwargs):
        return types.SimpleNamespace(
            input_ids=torch.zeros(len(prompts), self.model_max_length, dtype=torch.long)
        )


def fake_pipeline(config: TrainConfig, folder: Path, weight_dtype: torch.dtype, mode):
    """(pipe, adapters): unet, vae, text encoder(s) and scheduler config of a diffusers folder with the
    run's adapters, as fake CPU tensors (no weights). Built on the meta device in the training dtypes (the
    VAE and the adapters float32), then every tensor is given a fake twin."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        unet_config = UNet2DConditionModel.load_config(folder, subfolder="unet")
        parts = {
            "unet": UNet2DConditionModel.from_config(unet_config),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
        }
        for name in TEXT_COMPONENTS:
            if index.get(name) and index[name][0] is not None:
                projection = index[name][1] == "CLIPTextModelWithProjection"
                cls = CLIPTextModelWithProjection if projection else CLIPTextModel
                parts[name] = cls(CLIPTextConfig.from_pretrained(folder / name))
        for name, model in parts.items():
            nn.Module.to(model, torch.float32 if name == "vae" else weight_dtype).eval()  # the VAE: float32
        length = parts["text_encoder"].config.max_position_embeddings
        tokenizers = {
            n.replace("text_encoder", "tokenizer"): _Ids(length) for n in TEXT_COMPONENTS if n in parts
        }
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        pipe = types.SimpleNamespace(**parts, **tokenizers, scheduler_config=scheduler)
        setup = add_adapters(pipe, config)
    cpu = torch.device("cpu")
    for model in parts.values():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None:
                        fake = mode.fake_tensor_converter.from_meta_and_device(mode, t, cpu)
                        is_param = isinstance(t, nn.Parameter)
                        store[key] = nn.Parameter(fake, requires_grad=t.requires_grad) if is_param else fake
    return pipe, setup


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
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
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
        optimizer = _optimizer(cfg, setup.trainable_parameters())
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
                    batch, unet_fn, latents_of, scheduler, prompts, resolution, weight_dtype,
                    cfg.prior_loss_weight, cfg.snr_gamma, noise_offset=cfg.noise_offset,
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
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        config.mixed_precision
    ]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    config = _placeholder_bound(config)
    pipe, setup = fake_pipeline(config, folder, weight_dtype, mode)
    unet_cfg = pipe.unet.config
    resolution = config.resolution or unet_cfg.sample_size * 2 ** (
        len(pipe.vae.config.block_out_channels) - 1
    )
    low = None if config.mixed_precision == "no" else weight_dtype

    def autocast():
        return torch.autocast("cpu", dtype=low) if low is not None else contextlib.nullcontext()

    kernels = cuda_kernels() if device == "cuda" else contextlib.nullcontext()
    with mode, kernels, torch.random.fork_rng(devices=[]):
        tracker = LiveBytes(CUDA_BLOCK if device == "cuda" else 1)
        result = simulate(config, pipe, setup, resolution, tracker, autocast)
    return dataclasses.replace(result, device=device)


def measure_cpu_memory(config: TrainConfig) -> tuple[MemoryEstimate, int]:
    """The same phases on real CPU tensors of the real model (weights loaded), for validating the estimate:
    (the counter's result, the peak bytes that torch's profiler saw allocated, plus what was resident)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    from .. import diffusion

    if config.mixed_precision == "fp16":
        raise ValueError("measuring on the CPU needs --mixed_precision no or bf16")
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16}[config.mixed_precision]
    loaded = diffusion.load_pipeline(config.pretrained_model_name_or_path, weight_dtype)
    torch.nn.Module.to(loaded.vae, dtype=torch.float32)
    names = ("unet", "vae", "tokenizer", "tokenizer_2", *TEXT_COMPONENTS)
    pipe = types.SimpleNamespace(
        **{n: getattr(loaded, n) for n in names if getattr(loaded, n, None) is not None},
        scheduler_config=dict(loaded.scheduler.config),
    )
    resolution = config.resolution or pipe.unet.config.sample_size * loaded.vae_scale_factor
    low = None if config.mixed_precision == "no" else weight_dtype

    def autocast():
        return torch.autocast("cpu", dtype=low) if low is not None else contextlib.nullcontext()

    config = _placeholder_bound(config)
    setup = add_adapters(pipe, config)
    models = [pipe.unet, pipe.vae, *(getattr(pipe, n) for n in TEXT_COMPONENTS if hasattr(pipe, n))]
    resident = _storage_bytes(t for m in models for t in _module_tensors(m))  # weights and adapters
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        result = simulate(config, pipe, setup, resolution, LiveBytes(), autocast)
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return dataclasses.replace(result, device="cpu"), resident + peak
