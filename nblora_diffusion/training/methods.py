"""The trained adapter, one strategy object per kind: NB-LoRA (through diffusion.add_nblora) or a PEFT
baseline (LoRA, DoRA, PiSSA) on the same targets.

``add_adapters`` looks the kind up once (``METHODS[config.adapter]``) and returns its ``AdapterSetup``; the
trainer then calls the setup's operations (trainable parameters, factor pairs for the norm log, the base
model for output preservation, max-norm rescaling, saving) and never branches on the kind's name.

Baselines use PEFT's own LoraConfig with lora_alpha = rank (scale 1), so their saved weights need no alpha
bookkeeping and compare one-to-one with NB-LoRA's export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import diffusion
from ..core import NBLoRAConfig, nblora_layers
from ..core.bounds import matrix_schatten_norm
from ..core.inject import matches
from ..formats import KOHYA_LORA_FILE
from .config import TrainConfig

# free parameters on the input side (Ã, Ṽ, LoRA A) and the output side (B̃, Ũ, LoRA B) of each update
INPUT_FACTORS = ("nblora_A", "nblora_V", "lora_A")
OUTPUT_FACTORS = ("nblora_B", "nblora_U", "lora_B")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")

# (component.layer, left (m, k), right (n, k), δ, p) with the layer's update W = left @ rightᵀ
FactorPair = tuple[str, torch.Tensor, torch.Tensor, float, float]


@dataclass
class AdapterSetup:
    """What trains (``models``: component -> model) and what the trainer does with it, for one kind."""

    kind: ClassVar[str]
    models: dict[str, nn.Module]  # unet, text_encoder, text_encoder_2
    p: float

    # -- the same for every kind ---------------------------------------------------------------------
    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [
            (f"{c}.{n}", p)
            for c, m in self.models.items()
            for n, p in m.named_parameters()
            if p.requires_grad
        ]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable()]

    def factor_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(input-side, output-side) factors: the two halves Bernoulli-LoRA alternates between."""

        def leaf(name: str) -> str:  # "...to_q.nblora_A" / "...to_q.lora_A.default.weight" -> the factor
            return [part for part in name.split(".") if part not in ("default", "weight")][-1]

        named = self.named_trainable()
        pick = {n: leaf(n) for n, _ in named}
        return (
            [p for n, p in named if pick[n] in INPUT_FACTORS],
            [p for n, p in named if pick[n] in OUTPUT_FACTORS],
        )

    def state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name: what a checkpoint needs to resume exactly."""
        return {n: p.detach() for n, p in self.named_trainable()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_trainable())
        if set(own) != set(tensors):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(
                f"checkpoint adapter does not fit this run: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for n, p in own.items():
            if tuple(tensors[n].shape) != tuple(p.shape):
                raise ValueError(
                    f"checkpoint tensor {n} has shape {tuple(tensors[n].shape)}, the run {tuple(p.shape)}"
                )
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(tensors[n].to(p.device))

    # -- what each kind does its own way ------------------------------------------------------------
    def inject(self, pipe, unet_cfg: NBLoRAConfig, text_cfg: NBLoRAConfig | None) -> None:
        """Add this kind's adapters to ``models`` on the targets of the two configs."""
        raise NotImplementedError

    def factor_pairs(self) -> list[FactorPair]:
        """Every adapted layer's update as two factors, for the norm log (``norms.layer_norms``)."""
        raise NotImplementedError

    def base_model(self) -> contextlib.AbstractContextManager:
        """Inside: the UNet computes the frozen base model (adapter off), restored on exit."""
        raise NotImplementedError

    def limit_norms(self, max_norm: float) -> tuple[int, float]:
        """--scale_weight_norms after an optimizer step: (pairs rescaled, largest norm before)."""
        raise ValueError(f"--scale_weight_norms applies to --adapter lora, not {self.kind}")

    def save(
        self, pipe, folder: Path, config: TrainConfig, step: int, final: bool, token: str | None
    ) -> None:
        """Write the adapter's files into ``folder`` (the final save adds the LoRA exports)."""
        raise NotImplementedError


class NBLoRA(AdapterSetup):
    kind = "nblora"

    def inject(self, pipe, unet_cfg, text_cfg):
        diffusion.add_nblora(pipe, unet_cfg, text_cfg)

    def factor_pairs(self):
        pairs = []
        for comp, model in self.models.items():
            for name, layer in nblora_layers(model):
                A, B = layer.factors()
                pairs.append((f"{comp}.{name}", B, A.mT, layer.delta * layer.scale, layer.p))
        return pairs

    @contextlib.contextmanager
    def base_model(self) -> Iterator[None]:
        # scale 0 skips the adapter branch: the base model exactly
        layers = [layer for _, layer in nblora_layers(self.models["unet"])]
        scales = [layer.scale for layer in layers]
        for layer in layers:
            layer.scale = 0.0
        try:
            yield
        finally:
            for layer, s in zip(layers, scales, strict=True):
                layer.scale = s

    def save(self, pipe, folder, config, step, final, token):
        diffusion.save_adapter(
            pipe,
            folder,
            base_model=config.pretrained_model_name_or_path,
            token=token,
            instance_prompt=config.instance_prompt,
            class_prompt=config.class_prompt,
            global_step=step,
            norm_p=config.norm_p,
            train_text_encoder=config.train_text_encoder,
        )
        if final:
            diffusion.export_diffusers_lora(pipe, folder)
            if config.export_kohya:
                diffusion.export_kohya_lora(pipe, folder / KOHYA_LORA_FILE, resolution=config.resolution)


@dataclass
class _PEFT(AdapterSetup):
    """PEFT LoRA layers (``lora_A``/``lora_B`` under the adapter name "default") on the same targets."""

    init: ClassVar[str] = "gaussian"  # PEFT's init_lora_weights
    use_dora: ClassVar[bool] = False
    # the bound NB-LoRA would use on the same layer, for logging the baselines' norm ratios
    bounds: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> layer -> δ

    def inject(self, pipe, unet_cfg, text_cfg):
        from peft import LoraConfig

        for comp, model in self.models.items():
            cfg = unet_cfg if comp == "unet" else text_cfg
            linear = {
                n: m
                for n, m in model.named_modules()
                if n and matches(n, cfg.target_modules) and isinstance(m, nn.Linear)
            }
            if not linear:
                raise ValueError(f"no nn.Linear module of the {comp} matches {list(cfg.target_modules)}")
            self.bounds[comp] = {
                n: cfg.delta
                if cfg.delta is not None
                else cfg.gamma * float(matrix_schatten_norm(m.weight, cfg.p))
                for n, m in linear.items()
            }
            lora = LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.rank,
                lora_dropout=cfg.dropout,
                init_lora_weights=self.init,
                use_dora=self.use_dora,
                target_modules=sorted(linear),
            )
            model.add_adapter(lora)
            for p in model.parameters():  # PEFT keeps the base dtype; train the adapter in float32
                if p.requires_grad:
                    p.data = p.data.float()

    def lora_modules(self, comp: str) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.models[comp].named_modules():
            if name in self.bounds.get(comp, {}):
                yield name, module

    def factor_pairs(self):
        return [
            (f"{comp}.{name}", *self.update_factors(comp, name, module), self.bounds[comp][name], self.p)
            for comp in self.models
            for name, module in self.lora_modules(comp)
        ]

    def update_factors(self, comp: str, name: str, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with the layer's change from the original weight = left @ rightᵀ: s·B, Aᵀ."""
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, n), (m, r)
        return B * module.scaling["default"], A.mT

    @contextlib.contextmanager
    def base_model(self) -> Iterator[None]:
        unet = self.models["unet"]
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()

    def lora_layers(self) -> dict[str, dict[str, torch.Tensor]]:
        """component -> PEFT-keyed LoRA tensors (lora_A/lora_B, DoRA magnitudes)."""
        from peft.utils import get_peft_model_state_dict

        return {
            comp: {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(m).items()}
            for comp, m in self.models.items()
        }

    def lora_metadata(self) -> dict[str, dict]:
        """Extra ``save_lora_weights`` arguments: LoRA/PiSSA are plain (alpha = rank)."""
        return {}

    def save(self, pipe, folder, config, step, final, token):
        self.save_diffusers(pipe, folder)
        if final and config.export_kohya:
            self.save_kohya(pipe, folder / KOHYA_LORA_FILE, config.resolution)

    def save_diffusers(self, pipe, folder: Path) -> Path:
        """pytorch_lora_weights.safetensors in diffusers' format, loadable by ``pipe.load_lora_weights``."""
        from diffusers.utils import convert_state_dict_to_diffusers

        kwargs = {
            f"{c}_lora_layers": convert_state_dict_to_diffusers(sd) for c, sd in self.lora_layers().items()
        }
        type(pipe).save_lora_weights(folder, **kwargs, **self.lora_metadata())
        return folder / "pytorch_lora_weights.safetensors"

    def save_kohya(self, pipe, path: Path, resolution: int | None = None) -> Path:
        """kohya / A1111 keys via diffusers' converter (alpha = rank, so the file's update is up @ down),
        with the metadata A1111/ComfyUI read to class the file."""
        from diffusers.utils import convert_state_dict_to_kohya

        from ..core import atomic_save_safetensors
        from ..diffusion.export import network_metadata

        prefixed = {f"{c}.{k}": v for c, sd in self.lora_layers().items() for k, v in sd.items()}
        kohya = convert_state_dict_to_kohya(prefixed)
        if not diffusion.is_sdxl(
            pipe
        ):  # SD1.x/2.x tools name the one text encoder lora_te_, as export_kohya_lora
            kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
        rank = max(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight"))
        atomic_save_safetensors(kohya, path, {"format": "pt", **network_metadata(pipe, rank, resolution)})
        return path


class LoRA(_PEFT):
    kind = "lora"

    @torch.no_grad()
    def limit_norms(self, max_norm):
        # kohya sd-scripts' max_norm_regularization: B and A each by √(MAX/‖·‖), which keeps their balance
        scaled, largest = 0, 0.0
        for comp in self.models:
            for _, module in self.lora_modules(comp):
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, n), (m, r)
                norm = float(torch.linalg.matrix_norm((B.float() * module.scaling["default"]) @ A.float()))
                largest = max(largest, norm)
                if norm > max_norm:
                    root = (max_norm / norm) ** 0.5
                    A.mul_(root)
                    B.mul_(root)
                    scaled += 1
        return scaled, largest


class DoRA(_PEFT):
    kind = "dora"
    use_dora = True

    def lora_metadata(self):  # DoRA needs its config to load
        return {
            f"{c}_lora_adapter_metadata": m.peft_config["default"].to_dict() for c, m in self.models.items()
        }


@dataclass
class PiSSA(_PEFT):
    """PiSSA moves the principal part out of the base weight (W = W_res + B₀A₀): the update from W is
    s(BA − B₀A₀), and the base model is the adapter at its initial factors."""

    kind: ClassVar[str] = "pissa"
    init: ClassVar[str] = "pissa"
    initial: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # component -> A₀, B₀ by key

    def inject(self, pipe, unet_cfg, text_cfg):
        from peft.utils import get_peft_model_state_dict

        super().inject(pipe, unet_cfg, text_cfg)
        for comp, model in self.models.items():
            self.initial[comp] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    def update_factors(self, comp, name, module):
        left, right = super().update_factors(comp, name, module)  # s·B (m, r), Aᵀ (n, r)
        init, scale = self.initial[comp], module.scaling["default"]
        A0, B0 = init[f"{name}.lora_A.weight"].to(right), init[f"{name}.lora_B.weight"].to(left)
        return torch.cat([left, -B0 * scale], 1), torch.cat([right, A0.mT], 1)  # (m, 2r), (n, 2r)

    @contextlib.contextmanager
    def base_model(self) -> Iterator[None]:
        init = self.initial["unet"]
        pairs = [
            (getattr(module, side)["default"].weight, init[f"{name}.{side}.weight"])
            for name, module in self.lora_modules("unet")
            for side in ("lora_A", "lora_B")
        ]
        saved = [t.detach().clone() for t, _ in pairs]
        with torch.no_grad():
            for t, t0 in pairs:
                t.copy_(t0)
        try:
            yield
        finally:
            with torch.no_grad():
                for (t, _), s in zip(pairs, saved, strict=True):
                    t.copy_(s)

    def lora_layers(self):
        # W_res + BA = W + [B, −B₀] [A; A₀]: a rank-2r LoRA (PEFT's own PiSSA-to-LoRA rule)
        out = super().lora_layers()
        for comp, sd in out.items():
            init = self.initial[comp]
            for key in [k for k in sd if k.endswith("lora_A.weight")]:
                bkey = key.replace("lora_A", "lora_B")
                sd[key] = torch.cat([sd[key], init[key].float().cpu()], 0)
                sd[bkey] = torch.cat([sd[bkey], -init[bkey].float().cpu()], 1)
        return out


METHODS: dict[str, type[AdapterSetup]] = {m.kind: m for m in (NBLoRA, LoRA, DoRA, PiSSA)}


def nblora_configs(pipe, config: TrainConfig) -> tuple[NBLoRAConfig, NBLoRAConfig | None]:
    """The per-layer configs of the UNet and (with --train_text_encoder) the text encoders."""
    arch = diffusion.architecture(pipe)
    common = {
        "p": config.norm_p,
        "preset": config.target_preset,
        "parameterization": config.parameterization,
        "dropout": config.adapter_dropout,
        "arch": arch,
    }
    unet = diffusion.make_config(
        config.rank, delta=config.norm_bound, gamma=config.norm_bound_ratio, component="unet", **common
    )
    text = None
    if config.train_text_encoder:
        delta, gamma = config.norm_bound, config.norm_bound_ratio
        if config.text_encoder_norm_bound is not None:
            delta, gamma = config.text_encoder_norm_bound, None
        text = diffusion.make_config(
            config.text_encoder_rank or config.rank,
            delta=delta,
            gamma=gamma,
            component="text_encoder",
            **common,
        )
    return unet, text


def add_adapters(pipe, config: TrainConfig) -> AdapterSetup:
    """Freeze the pipeline and add the adapter named by ``config.adapter``; returns what trains."""
    parts = diffusion.components(pipe)
    for model in parts.values():
        model.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    unet_cfg, text_cfg = nblora_configs(pipe, config)
    names = ["unet"] + ([c for c in TEXT_COMPONENTS if c in parts] if config.train_text_encoder else [])
    setup = METHODS[config.adapter]({c: parts[c] for c in names}, config.p)
    setup.inject(pipe, unet_cfg, text_cfg)
    return setup
