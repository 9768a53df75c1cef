"""Adapter state dicts, safetensors save/load, atomic writes and the plain-LoRA export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from nblora_diffusion import (
    NBLoRAConfig,
    export_lora_state_dict,
    inject_nblora,
    load_nblora,
    load_nblora_state_dict,
    nblora_state_dict,
    save_nblora,
)
from nblora_diffusion.core import cayley_transposed, nblora_layers, read_nblora_file, set_nblora_scale

TARGETS = ("to_q", "to_v")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_v = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.to_v(torch.relu(self.to_q(x))))


def base_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def adapted(config: NBLoRAConfig, seed: int = 0) -> Net:
    model = base_net(seed)
    inject_nblora(model, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in nblora_state_dict(model).items():
            if not name.endswith("nblora_delta"):
                t.copy_(torch.randn(t.shape, generator=gen))
    return model


CONFIGS = {
    "II-p2": NBLoRAConfig(rank=3, p=2, delta=1.5, target_modules=TARGETS),
    "I-pinf": NBLoRAConfig(rank=4, p="inf", delta=0.5, target_modules=TARGETS, parameterization="I"),
    "II-gamma-p3.5": NBLoRAConfig(rank=2, p=3.5, gamma=0.3, target_modules=TARGETS, dropout=0.1),
}


def test_state_dict_holds_only_adapter_tensors():
    sd = nblora_state_dict(adapted(CONFIGS["II-p2"]))
    assert sd and all(k.rsplit(".", 1)[-1].startswith("nblora_") for k in sd)
    assert {k.rsplit(".", 1)[0] for k in sd} == set(TARGETS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip_into_a_fresh_model(tmp_path, name):
    model = adapted(CONFIGS[name]).eval()
    path = tmp_path / "adapter.safetensors"
    save_nblora(model, path, base_model="tiny-net", token="sks")
    fresh = base_net().eval()  # no adapters yet: load_nblora injects from the saved configs
    meta = load_nblora(fresh, path)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    for (n1, l1), (n2, l2) in zip(nblora_layers(model), nblora_layers(fresh), strict=True):
        assert n1 == n2 and torch.equal(l1.delta_weight(), l2.delta_weight())
    assert meta["base_model"] == "tiny-net" and meta["token"] == "sks"
    layers = json.loads(meta["layers"])
    config = CONFIGS[name]
    for layer_name, info in layers.items():
        assert info["rank"] == config.rank and info["parameterization"] == config.parameterization
        assert info["p"] == ("inf" if math.isinf(config.p) else config.p)
        assert math.isclose(info["delta"], dict(nblora_layers(model))[layer_name].delta, rel_tol=1e-6)
    assert NBLoRAConfig.from_dict(json.loads(meta["configs"])[0]) == config


def test_save_is_safetensors_with_no_pickle(tmp_path):
    path = tmp_path / "a.safetensors"
    save_nblora(adapted(CONFIGS["II-p2"]), path)
    tensors, meta = read_nblora_file(path)
    assert meta["format"] == "nblora" and set(tensors) == set(nblora_state_dict(adapted(CONFIGS["II-p2"])))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_load_into_an_injected_model_replaces_the_weights_and_cache(tmp_path):
    source = adapted(CONFIGS["I-pinf"], seed=0)
    target = adapted(CONFIGS["I-pinf"], seed=0)
    with torch.no_grad():
        for t in nblora_state_dict(target).values():
            t.mul_(0.5)
        x = torch.randn(2, 8)
        target(x)  # fill the inference cache with the old values
    save_nblora(source, tmp_path / "a.safetensors")
    load_nblora(target, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd.pop("to_q.nblora_A"), "1 missing"),
        (lambda sd: sd.update({"head.nblora_A": torch.zeros(1)}), "1 unexpected"),
        (lambda sd: sd.update({"to_q.nblora_A": torch.zeros(2, 8)}), r"to_q.nblora_A: shape \(2, 8\)"),
        (lambda sd: sd.update({"to_q.nblora_A": torch.zeros(3, 8, dtype=torch.int32)}), "torch.int32"),
    ],
)
def test_load_state_dict_rejects_mismatches_without_touching_the_model(mutate, message):
    model = adapted(CONFIGS["II-p2"])
    before = {k: v.clone() for k, v in nblora_state_dict(model).items()}
    sd = {k: torch.randn_like(v) for k, v in before.items()}
    mutate(sd)
    with pytest.raises(ValueError, match=message):
        load_nblora_state_dict(model, sd)
    assert all(torch.equal(v, before[k]) for k, v in nblora_state_dict(model).items())


def test_load_state_dict_into_a_model_without_adapters_is_an_error():
    with pytest.raises(ValueError, match="inject before loading"):
        load_nblora_state_dict(base_net(), {"to_q.nblora_A": torch.zeros(3, 8)})


def test_load_of_a_missing_corrupt_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_nblora(base_net(), tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_nblora(base_net(), tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an NB-LoRA adapter file"):
        load_nblora(base_net(), tmp_path / "other.safetensors")


def test_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_nblora(adapted(CONFIGS["II-p2"]), path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("nblora_diffusion.core.state.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_nblora(adapted(CONFIGS["I-pinf"]), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_saving_or_exporting_a_model_without_adapters_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no NB-LoRA adapters"):
        save_nblora(base_net(), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="no NB-LoRA adapters"):
        export_lora_state_dict(base_net())
    assert not list(tmp_path.iterdir())


# -- export to a plain LoRA ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_export_reproduces_delta_weight(name, scale):
    model = adapted(CONFIGS[name])
    set_nblora_scale(model, scale)
    sd = export_lora_state_dict(model, prefix="unet.")
    assert sorted(sd) == sorted(f"unet.{t}.lora_{ab}.weight" for t in TARGETS for ab in "AB")
    for layer_name, layer in nblora_layers(model):
        A, B = sd[f"unet.{layer_name}.lora_A.weight"], sd[f"unet.{layer_name}.lora_B.weight"]
        assert A.shape == (layer.rank, layer.in_features) and B.shape == (layer.out_features, layer.rank)
        assert torch.allclose(B @ A, layer.delta_weight(), rtol=0, atol=1e-6)


def test_export_of_parameterization_II_is_A_and_2BtS():
    model = adapted(CONFIGS["II-p2"])
    layer = model.to_q
    A, B = cayley_transposed([layer.nblora_A, layer.nblora_B], fused=False)  # [Ã, B̃] -> [A, B]
    sd = export_lora_state_dict(model)
    assert torch.allclose(sd["to_q.lora_A.weight"], A)  # A (r, n), orthonormal rows with B
    assert torch.allclose(sd["to_q.lora_B.weight"], B.mT * (2 * layer.bound_vector()))  # 2BᵀS


@pytest.mark.parametrize("name", ["II-p2", "I-pinf"])
def test_exported_lora_loads_into_peft_and_reproduces_the_outputs(name):
    model = adapted(CONFIGS[name]).eval()
    config = CONFIGS[name]
    peft_model = get_peft_model(
        base_net(), LoraConfig(r=config.rank, lora_alpha=config.rank, target_modules=list(TARGETS))
    )
    sd = export_lora_state_dict(model, prefix="base_model.model.")
    result = set_peft_model_state_dict(peft_model, sd)
    assert not result.unexpected_keys
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(peft_model(x), model(x), rtol=0, atol=1e-6)


def test_exported_tensors_are_detached_copies():
    model = adapted(CONFIGS["II-p2"])
    sd = export_lora_state_dict(model)
    assert all(not t.requires_grad for t in sd.values())
    sd["to_q.lora_A.weight"].zero_()
    assert not torch.equal(export_lora_state_dict(model)["to_q.lora_A.weight"], sd["to_q.lora_A.weight"])
