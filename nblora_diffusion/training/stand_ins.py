"""What the memory estimate (``training.memory``) runs in place of a training run's real pieces.

- The models: the real-size UNet, VAE and text encoder(s) built from a diffusers config folder
  (``model_folder`` finds it, ``fake_pipeline`` builds them on the meta device and gives every tensor a fake
  twin: shapes, dtypes and strides, no data), with a tokenizer that gives token ids of the right shape.
- The optimizers that cannot run on fake tensors (bitsandbytes' AdamW8bit needs a GPU, Prodigy reads tensor
  values with ``.item()``): their state tensors are allocated at the first step, nothing is computed.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig
from .methods import TEXT_COMPONENTS, add_adapters

# hub ids whose configs ship in diffusion/configs, so the estimate needs neither the hub nor the cache
KNOWN_MODELS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-2-1-base": "sd21-base",
    "stabilityai/stable-diffusion-2-1": "sd21-v",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl-base",
}


# -- optimizers that cannot run on fake tensors -----------------------------------------------------------
def adamw8bit_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
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


def prodigy_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
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


def optimizer(config: TrainConfig, params: list) -> torch.optim.Optimizer:
    """``config.optimizer`` over ``params`` as it allocates: torch's AdamW itself, the others as stand-ins."""
    if config.optimizer == "adamw8bit":
        return _StateSizes(params, adamw8bit_state)
    if config.optimizer == "prodigy":
        return _StateSizes(params, prodigy_state)
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
