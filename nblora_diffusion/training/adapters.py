"""The trained adapter: NB-LoRA through diffusion.add_nblora, or a PEFT baseline on the same targets.

Baselines (LoRA, DoRA, PiSSA) use PEFT's own LoraConfig with lora_alpha = rank (scale 1), so their
saved weights need no alpha bookkeeping and compare one-to-one with NB-LoRA's export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import diffusion
from ..core import nblora_layers
from ..core.bounds import matrix_schatten_norm, schatten_norm
from ..core.inject import matches
from .config import TrainConfig

# free parameters on the input side (Ã, Ṽ, LoRA A) and the output side (B̃, Ũ, LoRA B) of each update
INPUT_FACTORS = ("nblora_A", "nblora_V", "lora_A")
OUTPUT_FACTORS = ("nblora_B", "nblora_U", "lora_B")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass
class AdapterSetup:
    kind: str  # "nblora" | "lora" | "dora" | "pissa"
    models: dict[str, nn.Module]  # component -> trained model (unet, text_encoder, text_encoder_2)
    p: float
    bounds: dict[str, dict[str, float]] = field(default_factory=dict)  # baselines: component -> layer -> δ
    pissa_init: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # PiSSA's A0, B0

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


def nblora_configs(pipe, config: TrainConfig):
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
    models = {c: parts[c] for c in names}
    if config.adapter == "nblora":
        diffusion.add_nblora(pipe, unet_cfg, text_cfg)
        return AdapterSetup("nblora", models, config.p)
    return _add_peft(models, config, unet_cfg, text_cfg)


def _add_peft(models: dict[str, nn.Module], config: TrainConfig, unet_cfg, text_cfg) -> AdapterSetup:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    setup = AdapterSetup(config.adapter, models, config.p)
    init = {"lora": "gaussian", "dora": "gaussian", "pissa": "pissa"}[config.adapter]
    for comp, model in models.items():
        cfg = unet_cfg if comp == "unet" else text_cfg
        linear = {
            n: m
            for n, m in model.named_modules()
            if n and matches(n, cfg.target_modules) and isinstance(m, nn.Linear)
        }
        if not linear:
            raise ValueError(f"no nn.Linear module of the {comp} matches {list(cfg.target_modules)}")
        # the bound NB-LoRA would use on the same layer, for logging the baselines' norm ratios
        setup.bounds[comp] = {
            n: cfg.delta
            if cfg.delta is not None
            else cfg.gamma * float(matrix_schatten_norm(m.weight, cfg.p))
            for n, m in linear.items()
        }
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.rank,
            lora_dropout=cfg.dropout,
            init_lora_weights=init,
            use_dora=config.adapter == "dora",
            target_modules=sorted(linear),
        )
        model.add_adapter(lora)
        for p in model.parameters():  # PEFT keeps the base dtype; train the adapter in float32
            if p.requires_grad:
                p.data = p.data.float()
        if config.adapter == "pissa":
            setup.pissa_init[comp] = {
                k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()
            }
    return setup


# -- norms (paper Fig. 9) -----------------------------------------------------------------------------
def lowrank_svdvals(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of W = left @ rightᵀ for stacks left (N, m, k), right (N, n, k): (N, k), descending.

    Only k×k work: with G_L = LᵀL, G_R = RᵀR and S = G_R^½, the nonzero σ² of W are the eigenvalues
    of S G_L S (WᵀW = R G_L Rᵀ shares them). Batched, so logging every layer costs a few small eighs.
    """
    g_left = left.double().mT @ left.double()  # (N, k, k)
    g_right = right.double().mT @ right.double()
    lam, V = torch.linalg.eigh(g_right)
    S = (V * lam.clamp(min=0).sqrt()[..., None, :]) @ V.mT  # G_R^½
    sigma2 = torch.linalg.eigvalsh(S @ g_left @ S).clamp(min=0)
    return sigma2.sqrt().flip(-1)


def _factor_pairs(setup: AdapterSetup) -> list[tuple[str, torch.Tensor, torch.Tensor, float, float]]:
    """(component.layer, left (m, k), right (n, k), δ, p) with W = left @ rightᵀ for every adapted layer."""
    pairs = []
    for comp, model in setup.models.items():
        if setup.kind == "nblora":
            for name, layer in nblora_layers(model):
                P_in, P_out, g = layer.factors()
                pairs.append(
                    (f"{comp}.{name}", P_out * (g * layer.scale), P_in, layer.delta * layer.scale, layer.p)
                )
            continue
        for name, module in model.named_modules():
            if name not in setup.bounds.get(comp, {}):
                continue
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, n), (m, r)
            scale = module.scaling["default"]
            left, right = B * scale, A.mT
            if setup.kind == "pissa":  # the change from the original weight is s(BA - B0A0)
                init = setup.pissa_init[comp]
                A0, B0 = init[f"{name}.lora_A.weight"].to(A), init[f"{name}.lora_B.weight"].to(B)
                left, right = torch.cat([left, -B0 * scale], 1), torch.cat([right, A0.mT], 1)
            pairs.append((f"{comp}.{name}", left, right, setup.bounds[comp][name], setup.p))
    return pairs


@torch.no_grad()
def layer_norms(setup: AdapterSetup) -> list[tuple[str, float, float, float]]:
    """(component.layer, ‖W‖_Sp, δ, σ₁) of every adapted layer's update W."""
    pairs = _factor_pairs(setup)
    groups: dict[tuple, list[int]] = {}
    for i, (_, left, right, _, _) in enumerate(pairs):
        groups.setdefault((left.shape, right.shape, left.device), []).append(i)
    sigmas: list[torch.Tensor | None] = [None] * len(pairs)
    for members in groups.values():
        stacked = lowrank_svdvals(
            torch.stack([pairs[i][1] for i in members]), torch.stack([pairs[i][2] for i in members])
        ).cpu()
        for i, s in zip(members, stacked, strict=True):
            sigmas[i] = s
    return [
        (name, float(schatten_norm(s, p)), bound, float(s[0]))
        for (name, _, _, bound, p), s in zip(pairs, sigmas, strict=True)
    ]


# -- saving --------------------------------------------------------------------------------------------
def peft_lora_layers(setup: AdapterSetup) -> dict[str, dict[str, torch.Tensor]]:
    """component -> PEFT-keyed LoRA tensors (lora_A/lora_B, DoRA magnitudes); PiSSA as a rank-2r LoRA."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for comp, model in setup.models.items():
        sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        if setup.kind == "pissa":  # W_res + BA = W + [B, -B0] [A; A0] (PEFT's own PiSSA-to-LoRA rule)
            init = setup.pissa_init[comp]
            for key in [k for k in sd if k.endswith("lora_A.weight")]:
                bkey = key.replace("lora_A", "lora_B")
                sd[key] = torch.cat([sd[key], init[key].float().cpu()], 0)
                sd[bkey] = torch.cat([sd[bkey], -init[bkey].float().cpu()], 1)
        out[comp] = sd
    return out


def save_peft_lora(pipe, setup: AdapterSetup, folder: Path) -> Path:
    """pytorch_lora_weights.safetensors in diffusers' format, loadable by ``pipe.load_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = peft_lora_layers(setup)
    kwargs = {f"{c}_lora_layers": convert_state_dict_to_diffusers(sd) for c, sd in layers.items()}
    if setup.kind == "dora":  # DoRA needs its config to load; LoRA/PiSSA are plain (alpha = rank)
        kwargs.update(
            {
                f"{c}_lora_adapter_metadata": m.peft_config["default"].to_dict()
                for c, m in setup.models.items()
            }
        )
    type(pipe).save_lora_weights(folder, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def save_peft_kohya(setup: AdapterSetup, path: Path, pipe, resolution: int | None = None) -> Path:
    """kohya / A1111 keys via diffusers' converter (alpha = rank, so the file's update is up @ down),
    with the metadata A1111/ComfyUI read to class the file."""
    from diffusers.utils import convert_state_dict_to_kohya

    from ..core import atomic_save_safetensors
    from ..diffusion import is_sdxl
    from ..diffusion.export import network_metadata

    prefixed = {f"{c}.{k}": v for c, sd in peft_lora_layers(setup).items() for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    if not is_sdxl(
        pipe
    ):  # SD1.x/2.x tools name the single text encoder lora_te_, as diffusion.export_kohya_lora does
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    rank = max(v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight"))
    atomic_save_safetensors(kohya, path, {"format": "pt", **network_metadata(pipe, rank, resolution)})
    return path
