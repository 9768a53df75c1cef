"""Renamed public names still import for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib

import pytest
import torch

OLD_TO_NEW = [
    ("nblora_diffusion.adapters", "add_nblora", "nblora_diffusion.adapters", "adapt_model"),
    ("nblora_diffusion.adapters", "make_config", "nblora_diffusion.adapters", "preset_config"),
    ("nblora_diffusion.adapters", "resolve_targets", "nblora_diffusion.adapters", "preset_modules"),
    ("nblora_diffusion.adapters", "save_adapter", "nblora_diffusion.adapters", "save_model_adapter"),
    ("nblora_diffusion.adapters", "load_adapter", "nblora_diffusion.adapters", "load_model_adapter"),
    ("nblora_diffusion.adapters.presets", "add_nblora", "nblora_diffusion.adapters", "adapt_model"),
    ("nblora_diffusion.adapters.io", "save_adapter", "nblora_diffusion.adapters", "save_model_adapter"),
    (
        "nblora_diffusion.diffusion.adapter",
        "resolve_targets",
        "nblora_diffusion.diffusion.adapter",
        "linear_targets",
    ),
    ("nblora_diffusion.diffusion.targets", "PRESETS", "nblora_diffusion.diffusion.targets", "PRESET_NAMES"),
    (
        "nblora_diffusion.training.config",
        "TARGET_PRESETS",
        "nblora_diffusion.diffusion.targets",
        "PRESET_NAMES",
    ),
    ("eval.dataset", "DreamBoothDataset", "eval.dataset", "DreamBoothBenchmark"),
    ("nblora_diffusion.diffusion.targets", "format_p", "nblora_diffusion.formats", "format_p"),
    (
        "nblora_diffusion.app_logic.handlers",
        "DEFAULT_BASE_MODEL",
        "nblora_diffusion.formats",
        "DEFAULT_BASE_MODEL",
    ),
]


@pytest.mark.parametrize(("old_module", "old", "new_module", "new"), OLD_TO_NEW)
def test_old_name_warns_and_is_the_new_object(old_module, old, new_module, new):
    module = importlib.import_module(old_module)
    with pytest.warns(DeprecationWarning, match=new):
        got = getattr(module, old)
    assert got is getattr(importlib.import_module(new_module), new)


def test_old_atomic_write_json_keeps_its_argument_order(tmp_path):
    import json

    from nblora_diffusion.adapters import io

    with pytest.warns(DeprecationWarning, match="fileio.atomic_write_json"):
        old = io.atomic_write_json
    old({"b": 1, "a": 2}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2, "b": 1}


def test_unknown_name_is_still_an_attribute_error():
    import nblora_diffusion.adapters as adapters

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adapters.nope  # noqa: B018


def test_model_adapter_folder_with_the_old_config_name_still_loads(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from nblora_diffusion import nblora_layers
    from nblora_diffusion.adapters import adapt_model, load_model_adapter, save_model_adapter
    from nblora_diffusion.formats import LEGACY_MODEL_ADAPTER_CONFIG_FILE, MODEL_ADAPTER_CONFIG_FILE

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    adapt_model(model, rank=2, p=2, delta=0.3, preset="llama-qv")
    folder = save_model_adapter(model, tmp_path / "old", base_model="org/tiny-llama")
    (folder / MODEL_ADAPTER_CONFIG_FILE).rename(folder / LEGACY_MODEL_ADAPTER_CONFIG_FILE)  # as 0.1 wrote it
    fresh = LlamaForCausalLM.from_pretrained(llama_dir)
    config = load_model_adapter(fresh, folder)
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert [n for n, _ in nblora_layers(fresh)] == [n for n, _ in nblora_layers(model)]


def test_long_calls_are_keyword_only_and_old_positional_calls_still_work():
    import inspect

    from nblora_diffusion._deprecated import keyword_only_since
    from nblora_diffusion.training.losses import dreambooth_loss
    from nblora_diffusion.training.sampling import ensure_class_images, generate

    for fn, first in ((dreambooth_loss, "latents_of"), (generate, "num"), (ensure_class_images, "prompt")):
        assert inspect.signature(fn).parameters[first].kind is inspect.Parameter.KEYWORD_ONLY

    @keyword_only_since(1, ("b", "c"))
    def f(a, *, b, c=3):
        return a, b, c

    assert f(1, b=2) == (1, 2, 3)
    with pytest.warns(DeprecationWarning, match="pass b, c by keyword"):
        assert f(1, 2, 4) == (1, 2, 4)
    with pytest.raises(TypeError, match="multiple values"):
        f(1, 2, b=2)
