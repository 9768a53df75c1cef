"""File names and format constants shared by the library, the trainer, the app and the evaluation.

One definition each: the adapter folder's file names, the hub-id pattern that tells a hub model from a
local path, the default base model, and how a norm exponent p is written in files and labels.
"""

from __future__ import annotations

import math
import re

# -- Stable Diffusion adapter folders (diffusion.save_adapter / training / app) --------------------------
ADAPTER_CONFIG_FILE = "nblora_config.json"  # the folder's JSON, written last: a folder with it loads
ADAPTER_FORMAT = "nblora-diffusion"  # its "format" key
ADAPTER_FORMAT_VERSION = 1
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # the name stock load_lora_weights(folder) looks for
KOHYA_LORA_FILE = "kohya_lora.safetensors"  # written by training with --export_kohya
TRAIN_CONFIG_FILE = "train_config.json"  # a training run's settings (TrainConfig.to_json)


def adapter_weights_file(component: str) -> str:
    """The native weights of one pipeline component in an adapter folder."""
    return f"nblora_{component}.safetensors"


# -- transformers (LLM/ViT) adapter folders (adapters.save_model_adapter) --------------------------------
MODEL_ADAPTER_WEIGHTS_FILE = "nblora_adapter.safetensors"
MODEL_ADAPTER_CONFIG_FILE = "nblora_adapter_config.json"
LEGACY_MODEL_ADAPTER_CONFIG_FILE = "nblora_config.json"  # before 0.2; still read by load_model_adapter
MODEL_ADAPTER_FORMAT = "nblora"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # the names peft.PeftModel.from_pretrained looks for
PEFT_CONFIG_FILE = "adapter_config.json"

# -- base models -------------------------------------------------------------------------------------------
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name; anything else names a local path


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the owner/name shape of a hub repository id."""
    return bool(HUB_ID.fullmatch(name))


# -- the norm exponent p -----------------------------------------------------------------------------------
def format_p(p: float) -> str | float:
    """p for JSON: the string "inf" for ∞ (JSON has no infinity), else the number itself."""
    return "inf" if math.isinf(p) else p


def p_label(p: float) -> str:
    """p as text: "inf" for ∞, else the shortest form (``f"{p:g}"``: 2.0 -> "2")."""
    return "inf" if math.isinf(p) else f"{p:g}"
