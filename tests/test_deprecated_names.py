"""Renamed public names still import for one release, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import importlib

import pytest
import torch

TM = "nblora_diffusion.transformer_models"  # the LLM/ViT package, once nblora_diffusion.adapters
OLD_TO_NEW = [  # ("module:old name", "module:new name")
    (f"{TM}:add_nblora", f"{TM}:adapt_model"),
    (f"{TM}:make_config", f"{TM}:preset_config"),
    (f"{TM}:resolve_targets", f"{TM}:preset_modules"),
    (f"{TM}:save_adapter", f"{TM}:save_model_adapter"),
    (f"{TM}:load_adapter", f"{TM}:load_model_adapter"),
    (f"{TM}.presets:add_nblora", f"{TM}:adapt_model"),
    (f"{TM}.io:save_adapter", f"{TM}:save_model_adapter"),
    (
        "nblora_diffusion.diffusion.adapter:resolve_targets",
        "nblora_diffusion.diffusion.adapter:linear_targets",
    ),
    ("nblora_diffusion.diffusion.targets:PRESETS", "nblora_diffusion.diffusion.targets:PRESET_NAMES"),
    ("nblora_diffusion.training.config:TARGET_PRESETS", "nblora_diffusion.diffusion.targets:PRESET_NAMES"),
    ("nblora_diffusion.training.adapters:add_adapters", "nblora_diffusion.training.methods:add_adapters"),
    ("nblora_diffusion.training.adapters:AdapterSetup", "nblora_diffusion.training.methods:AdapterSetup"),
    ("nblora_diffusion.training.adapters:layer_norms", "nblora_diffusion.training.norms:layer_norms"),
    ("nblora_diffusion.training.config:DEFAULT_MODEL", "nblora_diffusion.formats:DEFAULT_BASE_MODEL"),
    ("eval.dataset:DreamBoothDataset", "eval.dataset:DreamBoothBenchmark"),
    ("nblora_diffusion.diffusion.targets:format_p", "nblora_diffusion.formats:format_p"),
    ("nblora_diffusion.app_logic.handlers:DEFAULT_BASE_MODEL", "nblora_diffusion.formats:DEFAULT_BASE_MODEL"),
    ("nblora_diffusion.metrics:resolve_device", "nblora_diffusion.devices:resolve_device"),
]


def _resolve(where: str):
    module, name = where.split(":")
    return importlib.import_module(module), name


@pytest.mark.parametrize(("old", "new"), OLD_TO_NEW)
def test_old_name_warns_and_is_the_new_object(old, new):
    (old_module, old_name), (new_module, new_name) = _resolve(old), _resolve(new)
    with pytest.warns(DeprecationWarning, match=new_name):
        got = getattr(old_module, old_name)
    assert got is getattr(new_module, new_name)


def test_old_package_name_warns_once_and_is_the_new_package(monkeypatch):
    import sys
    import warnings

    import nblora_diffusion
    import nblora_diffusion.transformer_models as new

    old_names = [n for n in sys.modules if n.split(".")[:2] == ["nblora_diffusion", "adapters"]]
    for name in old_names:  # a first import, whatever ran before in this process
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delattr(nblora_diffusion, "adapters", raising=False)
    with pytest.warns(
        DeprecationWarning, match="nblora_diffusion.adapters is deprecated.*transformer_models"
    ):
        import nblora_diffusion.adapters as old
    assert old is new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second import and the old submodules do not warn again
        for sub in ("", ".io", ".presets", ".tiny", ".dp_merge", ".trainer"):  # the modules themselves
            assert importlib.import_module(f"nblora_diffusion.adapters{sub}") is importlib.import_module(
                TM + sub
            )
        from nblora_diffusion.adapters import adapt_model
    assert nblora_diffusion.adapters is new and adapt_model is new.adapt_model
    assert new.io.__spec__.name == f"{TM}.io"  # the module keeps its own spec


def test_old_atomic_write_json_keeps_its_argument_order(tmp_path):
    import json

    from nblora_diffusion.transformer_models import io

    with pytest.warns(DeprecationWarning, match="fileio.atomic_write_json"):
        old = io.atomic_write_json
    old({"b": 1, "a": 2}, tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2, "b": 1}


def test_unknown_name_is_still_an_attribute_error():
    import nblora_diffusion.transformer_models as transformer_models

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        transformer_models.nope  # noqa: B018


def test_model_adapter_folder_with_the_old_config_name_still_loads(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from nblora_diffusion import nblora_layers
    from nblora_diffusion.formats import LEGACY_MODEL_ADAPTER_CONFIG_FILE, MODEL_ADAPTER_CONFIG_FILE
    from nblora_diffusion.transformer_models import adapt_model, load_model_adapter, save_model_adapter

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
