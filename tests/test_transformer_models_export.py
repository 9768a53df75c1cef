"""Adapter folders: PEFT-format round trip (identical logits), native save/load, merge-and-unload."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaForCausalLM, ViTForImageClassification

from nblora_diffusion.core import nblora_layers, set_nblora_scale
from nblora_diffusion.transformer_models import (
    adapt_model,
    export_peft,
    load_model_adapter,
    merge_and_unload,
    preset_config,
    save_model_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def randomize(model, seed=1):
    """Adapters away from the W = 0 init, so a wrong key or scale cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in nblora_layers(model):
            for t in layer.adapter_tensors().values():
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model


def llama_logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def vit_logits(model):
    with torch.no_grad():
        return model.eval()(pixel_values=PIXELS).logits


@pytest.mark.parametrize("parameterization", ["I", "II"])
def test_peft_export_gives_identical_llama_logits(llama_dir, tmp_path, parameterization):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    adapt_model(model, rank=4, p=2, gamma=0.5, parameterization=parameterization)
    randomize(model)
    reference = llama_logits(model)
    assert not torch.allclose(reference, llama_logits(LlamaForCausalLM.from_pretrained(llama_dir)))
    export_peft(model, tmp_path / "peft", base_model=str(llama_dir))
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), tmp_path / "peft")
    torch.testing.assert_close(llama_logits(peft_model), reference, rtol=0, atol=1e-6)


def test_peft_export_gives_identical_vit_logits(vit_dir, tmp_path):
    model = ViTForImageClassification.from_pretrained(vit_dir)
    adapt_model(model, rank=2, p="inf", delta=0.5)
    randomize(model)
    export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(
        ViTForImageClassification.from_pretrained(vit_dir), tmp_path / "peft"
    )
    torch.testing.assert_close(vit_logits(peft_model), vit_logits(model), rtol=0, atol=1e-6)


def test_peft_folder_layout_keys_and_unit_scaling(llama_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    replaced = adapt_model(model, rank=3, delta=0.2, preset="llama-qv")
    export_peft(model, tmp_path / "peft", base_model="org/tiny-llama")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    assert sorted(config["target_modules"]) == sorted(replaced)
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["rank_pattern"] == {}
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in replaced for ab in "AB"}
    assert keys == expected


def test_peft_export_with_mixed_ranks_and_runtime_scale(llama_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    adapt_model(model, preset_config(rank=2, delta=0.4, preset="llama-attn"))
    adapt_model(model, preset_config(rank=5, p=1, delta=0.8, preset=["gate_proj", "up_proj", "down_proj"]))
    randomize(model)
    set_nblora_scale(model, 0.6)  # the inference slider is folded into lora_B
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (
        config["r"] == 2
        and len(config["rank_pattern"]) == 3 * 2
        and set(config["rank_pattern"].values()) == {5}
    )
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(llama_dir), tmp_path / "peft")
    torch.testing.assert_close(llama_logits(peft_model), llama_logits(model), rtol=0, atol=1e-6)


def test_native_save_load_round_trip_restores_logits(llama_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    adapt_model(model, rank=3, p=1, gamma=0.4, parameterization="I")
    randomize(model)
    save_model_adapter(model, tmp_path / "adapter", base_model="org/tiny-llama", note="round trip")
    fresh = LlamaForCausalLM.from_pretrained(llama_dir)
    config = load_model_adapter(fresh, tmp_path / "adapter")  # injects from the saved configs
    assert config["base_model_name_or_path"] == "org/tiny-llama" and config["note"] == "round trip"
    assert [n for n, _ in nblora_layers(fresh)] == [n for n, _ in nblora_layers(model)]
    torch.testing.assert_close(llama_logits(fresh), llama_logits(model), rtol=0, atol=0)


def test_merge_and_unload_matches_the_adapter_forward(vit_dir):
    model = ViTForImageClassification.from_pretrained(vit_dir)
    adapt_model(model, rank=2, p=2, gamma=0.8, preset="vit-all")
    randomize(model)
    reference = vit_logits(model)
    merged = merge_and_unload(model)
    assert not list(nblora_layers(merged))
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "fc1")))
    torch.testing.assert_close(vit_logits(merged), reference, rtol=1e-5, atol=1e-5)


def test_bad_folders_give_one_line_errors_and_write_nothing(llama_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="no NB-LoRA adapters"):
        export_peft(model, tmp_path / "peft")
    with pytest.raises(ValueError, match="no NB-LoRA adapters"):
        save_model_adapter(model, tmp_path / "native")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "native").exists()
    with pytest.raises(ValueError, match="not an NB-LoRA adapter folder"):
        load_model_adapter(model, tmp_path / "missing")
    adapt_model(model, rank=2, delta=0.1)
    save_model_adapter(model, tmp_path / "native")
    (tmp_path / "native" / "nblora_adapter.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a valid safetensors file") as err:
        load_model_adapter(LlamaForCausalLM.from_pretrained(llama_dir), tmp_path / "native")
    assert "\n" not in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        export_peft(model, tmp_path / "file")
