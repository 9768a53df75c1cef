"""NB-LoRA for transformers LLMs and ViTs: presets, PEFT-format export, DP merging.

Everything goes through the core's ``inject_nblora``; presets are data (``PRESETS``).
"""

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
from .io import export_peft, load_adapter, merge_and_unload, peft_lora_config_dict, save_adapter
from .presets import MODEL_TYPE_PRESETS, PRESETS, add_nblora, make_config, resolve_targets
from .tiny import make_tiny_llama, make_tiny_vit, tiny_llama_config, tiny_vit_config

__all__ = [
    "DPMergeReport",
    "LayerUpdate",
    "MODEL_TYPE_PRESETS",
    "NBLoRACheckpointCallback",
    "PRESETS",
    "adapter_updates",
    "add_nblora",
    "dp_merge",
    "export_peft",
    "frobenius_bound",
    "load_adapter",
    "lora_updates",
    "make_config",
    "make_tiny_llama",
    "make_tiny_vit",
    "merge_and_unload",
    "nblora_updates",
    "peft_lora_config_dict",
    "project_update",
    "resolve_targets",
    "save_adapter",
    "tiny_llama_config",
    "tiny_vit_config",
]


def __getattr__(name: str):
    # the Trainer callback imports transformers' Trainer stack; load it only when asked for
    if name == "NBLoRACheckpointCallback":
        from .trainer import NBLoRACheckpointCallback

        return NBLoRACheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
