"""nblora-diffusion: norm-bounded low-rank adapters (NB-LoRA) for diffusion models, LLMs and ViTs."""

from .core import (
    NBLoRAConfig,
    NBLoRALinear,
    cayley,
    export_lora_state_dict,
    inject_nblora,
    load_nblora,
    load_nblora_state_dict,
    merge_nblora,
    nblora_layers,
    nblora_state_dict,
    save_nblora,
    set_nblora_scale,
    unload_nblora,
    unmerge_nblora,
)

__version__ = "0.1.0"

__all__ = [
    "NBLoRAConfig",
    "NBLoRALinear",
    "cayley",
    "export_lora_state_dict",
    "inject_nblora",
    "load_nblora",
    "load_nblora_state_dict",
    "merge_nblora",
    "nblora_layers",
    "nblora_state_dict",
    "save_nblora",
    "set_nblora_scale",
    "unload_nblora",
    "unmerge_nblora",
]
