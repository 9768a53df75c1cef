"""Pure NB-LoRA math and the generic layer, shared by the diffusion and LLM/ViT parts."""

from .bounds import bound_vector, matrix_schatten_norm, parse_p, schatten_norm
from .cayley import cayley, cayley_sign_flip, cayley_transposed, cayley_transposed_groups, inverse_cayley
from .config import NBLoRAConfig
from .inject import (
    inject_nblora,
    injected_configs,
    materialize,
    merge_nblora,
    nblora_layers,
    set_nblora_scale,
    unload_nblora,
    unmerge_nblora,
)
from .layer import NBLoRALinear
from .stacks import stacked_factors
from .state import (
    atomic_save_safetensors,
    export_lora_state_dict,
    load_nblora,
    load_nblora_state_dict,
    nblora_state_dict,
    read_nblora_file,
    read_safetensors,
    save_nblora,
)

__all__ = [
    "NBLoRAConfig",
    "NBLoRALinear",
    "atomic_save_safetensors",
    "bound_vector",
    "cayley",
    "cayley_sign_flip",
    "cayley_transposed",
    "cayley_transposed_groups",
    "export_lora_state_dict",
    "inject_nblora",
    "injected_configs",
    "inverse_cayley",
    "load_nblora",
    "load_nblora_state_dict",
    "materialize",
    "matrix_schatten_norm",
    "merge_nblora",
    "nblora_layers",
    "nblora_state_dict",
    "parse_p",
    "read_nblora_file",
    "read_safetensors",
    "save_nblora",
    "schatten_norm",
    "set_nblora_scale",
    "stacked_factors",
    "unload_nblora",
    "unmerge_nblora",
]
