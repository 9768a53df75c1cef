"""NB-LoRA for 🤗 transformers models (LLaMA-style LLMs, ViTs): presets, adapter folders, PEFT-format
export, DP merging.

Everything goes through the core's ``inject_nblora``; presets are data (``PRESETS``). The names say they
act on one model (``adapt_model``, ``save_model_adapter``), where ``nblora_diffusion.diffusion``'s act on a
pipeline (``add_nblora``, ``save_adapter``). The package was called ``nblora_diffusion.adapters``; that name
and this package's old function names (``add_nblora``, ``make_config``, ``resolve_targets``,
``save_adapter``, ``load_adapter``) still work for one release, with a DeprecationWarning.
"""

from .._deprecated import deprecated_names
from .dp_merge import (
    DPMergeReport,
    LayerUpdate,
    adapter_updates,
    dp_merge,
    frobenius_bound,
    lora_updates,
    nblora_updates,
    project_update,
)
from .io import export_peft, load_model_adapter, merge_and_unload, peft_lora_config_dict, save_model_adapter
from .presets import MODEL_TYPE_PRESETS, PRESETS, adapt_model, preset_config, preset_modules
from .tiny import make_tiny_llama, make_tiny_vit, tiny_llama_config, tiny_vit_config

__all__ = [
    "DPMergeReport",
    "LayerUpdate",
    "MODEL_TYPE_PRESETS",
    "NBLoRACheckpointCallback",
    "PRESETS",
    "adapt_model",
    "adapter_updates",
    "dp_merge",
    "export_peft",
    "frobenius_bound",
    "load_model_adapter",
    "lora_updates",
    "make_tiny_llama",
    "make_tiny_vit",
    "merge_and_unload",
    "nblora_updates",
    "peft_lora_config_dict",
    "preset_config",
    "preset_modules",
    "project_update",
    "save_model_adapter",
    "tiny_llama_config",
    "tiny_vit_config",
]

_renamed = deprecated_names(
    __name__,
    {
        "add_nblora": ("adapt_model", lambda: adapt_model),
        "make_config": ("preset_config", lambda: preset_config),
        "resolve_targets": ("preset_modules", lambda: preset_modules),
        "save_adapter": ("save_model_adapter", lambda: save_model_adapter),
        "load_adapter": ("load_model_adapter", lambda: load_model_adapter),
    },
)


def __getattr__(name: str):
    # the Trainer callback imports transformers' Trainer stack; load it only when asked for
    if name == "NBLoRACheckpointCallback":
        from .trainer import NBLoRACheckpointCallback

        return NBLoRACheckpointCallback
    return _renamed(name)
