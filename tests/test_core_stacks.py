"""Stored stacks: an injected model keeps its adapters' tensors in one (L, ...) tensor per group and name,
while its state dict, the layers' tensors and every way of editing them stay those of per-layer tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nblora_diffusion import NBLoRAConfig, NBLoRALinear, inject_nblora, unload_nblora
from nblora_diffusion.core import load_nblora_state_dict, nblora_layers, nblora_state_dict

TARGETS = ("q", "k", "v", "out")


class Net(nn.Module):
    """Two groups of one shape (q, k, out: 6 -> 6; v: 4 -> 6) in two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"q": nn.Linear(6, 6), "k": nn.Linear(6, 6), "v": nn.Linear(4, 6), "out": nn.Linear(6, 6)}
            )
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["out"](torch.tanh(b["q"](x) + b["k"](x)) * b["v"](c))
        return x


def injected(par: str = "II", seed: int = 0, targets=TARGETS, adapter_seed: int = 1) -> Net:
    torch.manual_seed(seed)
    model = Net().double()
    inject_nblora(model, NBLoRAConfig(rank=2, p=2.0, delta=0.7, target_modules=targets, parameterization=par))
    gen = torch.Generator().manual_seed(adapter_seed)
    with torch.no_grad():
        for _, t in model.nblora_stacks.named_parameters():
            t.copy_(torch.randn(t.shape, dtype=t.dtype, generator=gen) * 0.5)
    return model


def inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(3, 6, dtype=torch.float64, generator=gen), torch.randn(
        3, 4, dtype=torch.float64, generator=gen
    )


def own_tensors_copy(model: Net) -> Net:
    """The same adapters, each layer owning its tensors (as built on its own), wrapped one by one."""
    plain = Net().double()
    for name, layer in nblora_layers(model):
        parent, _, child = name.rpartition(".")
        alone = NBLoRALinear(copy.deepcopy(layer.base_layer), 2, layer.p, layer.delta, layer.parameterization)
        with torch.no_grad():
            for n, t in layer.adapter_tensors().items():
                getattr(alone, n).copy_(t)
            alone.nblora_delta.copy_(layer.nblora_delta)
        plain.get_submodule(parent)[child] = alone
    return plain


@pytest.mark.parametrize("par", ["I", "II"])
def test_state_dict_has_the_per_layer_keys_order_and_values(par):
    model = injected(par)
    plain = own_tensors_copy(model)
    mine, theirs = model.state_dict(), plain.state_dict()
    assert list(mine) == list(theirs) and not any("nblora_stacks" in k for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert len(model.nblora_stacks.groups) == 2 and not list(model.blocks[0]["q"].parameters(recurse=False))


@pytest.mark.parametrize("par", ["I", "II"])
def test_outputs_and_gradients_equal_layers_that_own_their_tensors(par):
    model = injected(par)
    plain = own_tensors_copy(model)
    outs = [m(*inputs()) for m in (model, plain)]
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-13)
    for out in outs:
        out.square().sum().backward()
    for name, layer in nblora_layers(model):
        group, row = layer._home
        for n in group.names:
            assert torch.allclose(
                getattr(group, n).grad[row], getattr(plain.get_submodule(name), n).grad, atol=1e-12
            )


def test_load_state_dict_fills_the_stacks_and_reports_bad_keys():
    source, target = injected(), injected(adapter_seed=5)
    x = inputs()
    assert not torch.allclose(source(*x), target(*x))
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(*x), source(*x))
    sd = source.state_dict()
    missing = sd.pop("blocks.1.v.nblora_B")
    result = target.load_state_dict({**sd, "blocks.0.q.nblora_X": missing}, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["blocks.1.v.nblora_B"], ["blocks.0.q.nblora_X"])
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*blocks\.1\.v\.nblora_B"):
        target.load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks\.0\.q\.nblora_A"):
        target.load_state_dict({**source.state_dict(), "blocks.0.q.nblora_A": torch.zeros(3, 6)})


def test_adapter_state_dict_round_trip_and_writes_through_a_layer_land_in_its_stack():
    model, other = injected(), injected(adapter_seed=5)
    load_nblora_state_dict(other, nblora_state_dict(model))
    x = inputs()
    assert torch.equal(other(*x), model(*x))
    layer = model.blocks[1]["k"]
    group, row = layer._home
    with torch.no_grad():
        layer.nblora_B.add_(0.25)  # an edit through the layer's tensor is an edit of its group's row
    assert torch.equal(group.nblora_B[row], other.blocks[1]["k"].nblora_B + 0.25)
    model.eval()
    with torch.no_grad():
        before = model(*x)
        W = torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64)
        layer.set_delta_weight(W, project=True)
        assert not torch.allclose(model(*x), before)  # the frozen factors saw the new row
    assert torch.allclose(layer.delta_weight(), layer.compute_factors()[1] @ layer.compute_factors()[0])


def test_to_dtype_deepcopy_and_a_second_injection_keep_each_layer_on_its_row():
    model = injected(targets=("q", "k"))
    x = inputs()
    before = {n: layer.delta_weight().detach() for n, layer in nblora_layers(model)}
    inject_nblora(model, NBLoRAConfig(rank=2, p=2.0, delta=0.7, target_modules=("v", "out")))
    assert all(torch.equal(model.get_submodule(n).delta_weight(), w) for n, w in before.items())
    assert len(model.nblora_stacks.groups) == 2 and sum(1 for _ in nblora_layers(model)) == 8
    twin = copy.deepcopy(model)
    assert torch.equal(twin(*x), model(*x))
    with torch.no_grad():
        next(twin.nblora_stacks.parameters()).add_(1.0)
    assert not torch.equal(twin(*x), model(*x))  # the copy has its own stacks
    reference = model(*x)
    model.float()
    assert all(layer.nblora_A.dtype == torch.float32 for _, layer in nblora_layers(model))
    assert torch.allclose(model(*(t.float() for t in x)).double(), reference, atol=1e-5)
    unload_nblora(model, merge=False)
    assert not hasattr(model, "nblora_stacks") and not list(nblora_layers(model))


def test_optimizer_steps_the_stacks_and_every_layer_sees_the_step():
    model = injected()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=False)
    before = {n: layer.delta_weight().detach() for n, layer in nblora_layers(model)}
    model(*inputs()).square().sum().backward()
    opt.step()
    assert all(not torch.equal(model.get_submodule(n).delta_weight(), w) for n, w in before.items())
    assert len(opt.param_groups[0]["params"]) == sum(1 for p in model.parameters())
