"""Stable Diffusion integration: target presets, pipeline loading, adapter folders, slider, merge, exports."""

from .adapter import (
    CONFIG_NAME,
    adapted_components,
    add_nblora,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from .export import export_diffusers_lora, export_kohya_lora, import_lora
from .inference import get_norm_bound, merge_adapter, remove_adapter, set_norm_bound, unmerge_adapter
from .pipeline import architecture, components, is_sdxl, load_pipeline, parse_dtype
from .targets import TARGET_PRESETS, make_config, preset_targets

__all__ = [
    "CONFIG_NAME",
    "TARGET_PRESETS",
    "adapted_components",
    "add_nblora",
    "architecture",
    "components",
    "export_diffusers_lora",
    "export_kohya_lora",
    "get_norm_bound",
    "import_lora",
    "is_sdxl",
    "load_adapter",
    "load_pipeline",
    "make_config",
    "merge_adapter",
    "parse_dtype",
    "preset_targets",
    "read_adapter_config",
    "remove_adapter",
    "save_adapter",
    "set_norm_bound",
    "unmerge_adapter",
]
