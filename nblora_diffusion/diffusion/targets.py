"""Target presets (data) for Stable Diffusion 1.x / 2.x / XL and the config factory."""

from __future__ import annotations

from .._deprecated import deprecated_names
from ..core import NBLoRAConfig
from ..formats import format_p as _format_p

# UNet attention projections of every BasicTransformerBlock (attn1 self-, attn2 cross-attention)
_UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
# feed-forward of the transformer blocks (GEGLU input projection, output Linear)
_UNET_FF = ("ff.net.0.proj", "ff.net.2")
# Transformer2DModel input/output projections: Linear only with use_linear_projection (SD2.x, SDXL);
# SD1.x has 1×1 Conv2d there, which NB-LoRA (a Linear wrapper) does not cover
_UNET_PROJ = ("proj_in", "proj_out")
_CLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
_CLIP_MLP = ("mlp.fc1", "mlp.fc2")

# architecture -> component -> preset -> module names, matched on path boundaries by core.inject_nblora.
# "text_encoder" presets apply to every text encoder of the pipeline (SDXL: text_encoder and text_encoder_2).
TARGET_PRESETS: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "sd1": {
        "unet": {"attn": _UNET_ATTN, "wide": _UNET_ATTN + _UNET_FF},
        "text_encoder": {"attn": _CLIP_ATTN, "wide": _CLIP_ATTN + _CLIP_MLP},
    },
    "sd2": {
        "unet": {"attn": _UNET_ATTN, "wide": _UNET_ATTN + _UNET_FF + _UNET_PROJ},
        "text_encoder": {"attn": _CLIP_ATTN, "wide": _CLIP_ATTN + _CLIP_MLP},
    },
    "sdxl": {
        "unet": {"attn": _UNET_ATTN, "wide": _UNET_ATTN + _UNET_FF + _UNET_PROJ},
        "text_encoder": {"attn": _CLIP_ATTN, "wide": _CLIP_ATTN + _CLIP_MLP},
    },
}
ARCHITECTURES = tuple(TARGET_PRESETS)
COMPONENTS = ("unet", "text_encoder")
PRESET_NAMES = ("attn", "wide")  # the presets of every architecture and component


def preset_targets(preset: str = "attn", component: str = "unet", arch: str | None = None) -> tuple[str, ...]:
    """Module names of a preset. ``arch=None`` gives the widest variant (SD2/SDXL); ``add_nblora`` then
    skips names that are not nn.Linear in the actual model (SD1.x proj_in/proj_out)."""
    arch = arch or "sdxl"
    if arch not in TARGET_PRESETS:
        raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {arch!r}")
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    if preset not in PRESET_NAMES:
        raise ValueError(f"preset must be one of {list(PRESET_NAMES)}, got {preset!r}")
    return TARGET_PRESETS[arch][component][preset]


def make_config(
    rank: int,
    p: float | str,
    delta: float | None = None,
    gamma: float | None = None,
    preset: str = "attn",
    component: str = "unet",
    parameterization: str = "II",
    dropout: float = 0.0,
    arch: str | None = None,
    target_modules: tuple[str, ...] | list[str] | None = None,
) -> NBLoRAConfig:
    """An NBLoRAConfig for one pipeline component from a named preset.

    Give the absolute bound ``delta`` (δ on ‖W‖_Sp of every adapted layer) or the relative bound
    ``gamma`` (δ = γ·‖W_base‖_Sp per layer); with neither, γ = 0.1. ``target_modules`` overrides the
    preset with explicit module names.
    """
    if delta is None and gamma is None:
        gamma = 0.1  # updates of a tenth of each layer's own norm: a mild, scale-free default
    if delta is not None and gamma is not None:
        raise ValueError(f"give at most one of delta and gamma, got delta={delta}, gamma={gamma}")
    targets = tuple(target_modules) if target_modules is not None else preset_targets(preset, component, arch)
    return NBLoRAConfig(
        rank=rank,
        p=p,
        delta=delta,
        gamma=gamma,
        target_modules=targets,
        parameterization=parameterization,
        dropout=dropout,
    )


__getattr__ = deprecated_names(
    __name__,
    {
        "PRESETS": ("nblora_diffusion.diffusion.targets.PRESET_NAMES", lambda: PRESET_NAMES),
        "format_p": ("nblora_diffusion.formats.format_p", lambda: _format_p),
    },
)
