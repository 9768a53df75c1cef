"""Generic injection: matching, errors, batched materialisation vs the per-layer path, unload, gamma."""

from __future__ import annotations

import copy
import importlib
import math
from collections import defaultdict

import pytest
import torch
from torch import nn

from nblora_diffusion import NBLoRAConfig, NBLoRALinear, inject_nblora, unload_nblora
from nblora_diffusion.core import merge_nblora, nblora_layers, set_nblora_scale, unmerge_nblora
from nblora_diffusion.core.bounds import matrix_schatten_norm

inject_module = importlib.import_module("nblora_diffusion.core.inject")
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


class Attention(nn.Module):
    """Projection names and shapes of a diffusers cross-attention block; the math is irrelevant here."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(self.norm(x)), self.to_k(context), self.to_v(context)
        attn = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), dim=-1)  # (B, T, S)
        return x + self.to_out[0](attn @ v)


class TinyNet(nn.Module):
    """Three shape groups (8, 8), (8, 6) and (12, ...) plus a (6, 8) layer: same q as (8, 6), other split."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Attention(8, 6), Attention(8, 6), Attention(12, 6)])
        self.up = nn.Linear(8, 12)
        self.xto_q = nn.Linear(12, 8)  # "to_q" on a path boundary only: must not match
        self.context_proj = nn.Linear(8, 6)  # (out 6, in 8): q = 14 like to_k's (8, 6)
        self.to(dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = self.context_proj(torch.cat([context, context[..., :2]], dim=-1))
        x = self.blocks[1](self.blocks[0](x, context), context)
        return self.xto_q(self.blocks[2](self.up(x), context))


def inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, 5, 8, generator=gen, dtype=dtype), torch.randn(2, 4, 6, generator=gen, dtype=dtype)


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("nblora_"):
                t.copy_(torch.randn(t.shape, dtype=t.dtype, generator=gen) * 0.5)


def per_layer_copy(model: nn.Module) -> nn.Module:
    """The same adapters wrapped one by one, without the model-level batched pass."""
    plain = copy.deepcopy(model)
    del plain.forward  # the class's own forward again
    del plain.nblora_materializer
    return plain


def injected(config: NBLoRAConfig, dtype=torch.float64, seed=0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(dtype)
    inject_nblora(model, config)
    randomize_adapters(model)
    return model


# -- matching and errors ---------------------------------------------------------------------------
def test_inject_replaces_path_boundary_matches_only():
    model = TinyNet()
    names = inject_nblora(model, NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=("to_q", "to_out.0")))
    assert names == [f"blocks.{i}.{t}" for i in range(3) for t in ("to_q", "to_out.0")]
    assert isinstance(model.xto_q, nn.Linear) and not isinstance(model.xto_q, NBLoRALinear)
    assert isinstance(model.blocks[0].to_out[0], NBLoRALinear)


def test_inject_freezes_only_the_wrapped_base_weights():
    model = TinyNet()
    inject_nblora(model, NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=ATTN))
    trainable = {n for n, t in model.named_parameters() if t.requires_grad}
    assert "up.weight" in trainable and "blocks.0.to_q.base_layer.weight" not in trainable
    assert {n for n in trainable if "blocks" in n and "norm" not in n} == set()
    assert {n.split(".")[0] for n in trainable if n.rsplit(".", 1)[-1].startswith("nblora_")} == {
        "nblora_stacks"
    }


def assert_untouched(model: nn.Module, reference: nn.Module) -> None:
    assert not any(True for _ in nblora_layers(model))
    assert [(n, t.requires_grad) for n, t in model.named_parameters()] == [
        (n, t.requires_grad) for n, t in reference.named_parameters()
    ]


@pytest.mark.parametrize(
    ("targets", "rank", "message"),
    [
        (("to_x",), 2, r"matches target_modules \['to_x'\]"),
        (("norm",), 2, "'blocks.0.norm' is a LayerNorm"),
        (("to_q", "to_k"), 7, r"blocks.0.to_k: rank must be an integer in \[1, min\(out, in\) = 6\], got 7"),
        (("to_q", "to_out"), 2, "'blocks.0.to_out' is a ModuleList"),
    ],
)
def test_bad_injection_raises_and_leaves_the_model_untouched(targets, rank, message):
    model, reference = TinyNet(), TinyNet()
    with pytest.raises(ValueError, match=message):
        inject_nblora(model, NBLoRAConfig(rank=rank, p=2, delta=1.0, target_modules=targets))
    assert_untouched(model, reference)


def test_injecting_twice_into_the_same_module_is_an_error():
    model = TinyNet()
    inject_nblora(model, NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=("to_q",)))
    with pytest.raises(ValueError, match="'blocks.0.to_q' already has an NB-LoRA adapter"):
        inject_nblora(model, NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=("to_q",)))
    inject_nblora(
        model, NBLoRAConfig(rank=1, p=1, delta=0.5, target_modules=("to_v",))
    )  # other modules: fine
    assert len(list(nblora_layers(model))) == 6


def test_injecting_around_a_model_that_has_adapters_is_an_error_and_changes_nothing():
    model = TinyNet()
    inject_nblora(model.blocks[0], NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=("to_q",)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'blocks.0.to_q' holds an adapter injected into a submodule"):
        inject_nblora(model, NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=("to_v",)))
    assert not hasattr(model, "nblora_stacks") and len(list(nblora_layers(model))) == 1
    assert model.state_dict().keys() == state.keys()


def test_each_layer_keeps_its_config_and_the_model_only_the_materializer():
    """The per-layer config lives on the layer; injection adds ``forward``, ``nblora_materializer`` and the
    ``nblora_stacks`` submodule to the model and nothing else, and injected_configs reads the layers: each
    config once, in injection order."""
    model = TinyNet()
    before, children = dict(model.__dict__), list(model._modules)
    late, early = (  # injected in the opposite of module order: to_v comes after to_q in every block
        NBLoRAConfig(rank=2, p=2, gamma=0.1, target_modules=("to_v",)),
        NBLoRAConfig(rank=1, p=1, delta=0.5, target_modules=("to_q", "context_proj")),
    )
    inject_nblora(model, late)
    inject_nblora(model, early)
    assert set(model.__dict__) - set(before) == {"forward", inject_module.MATERIALIZER_ATTR}
    assert list(model._modules) == [*children, "nblora_stacks"]
    assert model.nblora_materializer is model.forward
    for name, layer in nblora_layers(model):
        assert layer.config is (late if name.endswith("to_v") else early)
    deltas = {layer.delta for name, layer in nblora_layers(model) if name.endswith("to_v")}
    assert len(deltas) == 3  # the resolved per-layer bound stays the layer's own nblora_delta
    assert inject_module.injected_configs(model) == [late.to_dict(), early.to_dict()]
    assert [layer.config for layer in model.nblora_materializer.layers[:3]] == [late] * 3
    unload_nblora(model)
    assert model.__dict__.keys() == before.keys() and inject_module.injected_configs(model) == []
    assert list(model._modules) == children


# -- relative bound --------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_relative_bound_gamma_is_taken_per_layer_from_the_base_weight(p):
    model = TinyNet()
    base_norms = {
        n: float(matrix_schatten_norm(m.weight.detach(), p))
        for n, m in model.named_modules()
        if n.endswith("to_v")
    }
    inject_nblora(model, NBLoRAConfig(rank=2, p=p, gamma=0.1, target_modules=("to_v",)))
    layers = dict(nblora_layers(model))
    assert set(layers) == set(base_norms)
    for name, layer in layers.items():
        assert math.isclose(layer.delta, 0.1 * base_norms[name], rel_tol=1e-12)
    assert len({layer.delta for layer in layers.values()}) == len(layers)


def test_relative_bound_of_a_zero_base_weight_is_an_error():
    model = TinyNet()
    with torch.no_grad():
        model.blocks[1].to_v.weight.zero_()
    with pytest.raises(ValueError, match="'blocks.1.to_v' is 0"):
        inject_nblora(model, NBLoRAConfig(rank=2, p=2, gamma=0.1, target_modules=("to_v",)))
    assert_untouched(model, TinyNet())


# -- batched materialisation -----------------------------------------------------------------------
CONFIGS = [
    NBLoRAConfig(rank=3, p=2.0, delta=1.0, target_modules=ATTN + ("context_proj",)),
    NBLoRAConfig(
        rank=6, p=math.inf, delta=0.3, target_modules=ATTN + ("context_proj",), parameterization="I"
    ),
    NBLoRAConfig(rank=2, p=3.5, gamma=0.5, target_modules=ATTN),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["II-p2", "I-pinf-fullrank", "II-gamma"])
def test_batched_materialisation_equals_per_layer_path_with_gradients(config):
    batched = injected(config)
    plain = per_layer_copy(batched)
    x, context = inputs()
    out_b, out_p = batched(x, context), plain(x, context)
    assert torch.allclose(out_b, out_p, rtol=0, atol=1e-13)
    weights = torch.randn(out_b.shape, dtype=out_b.dtype, generator=torch.Generator().manual_seed(5))
    (out_b * weights).sum().backward()
    (out_p * weights).sum().backward()
    grads_b = {n: t.grad for n, t in batched.named_parameters() if t.grad is not None}
    grads_p = {n: t.grad for n, t in plain.named_parameters() if t.grad is not None}
    assert grads_b.keys() == grads_p.keys() and any("nblora_" in n for n in grads_b)
    for name in grads_b:
        assert torch.allclose(grads_b[name], grads_p[name], rtol=0, atol=1e-12), name


@pytest.mark.parametrize("par", ["I", "II"])
@pytest.mark.parametrize("p", [math.inf, 2.0])
def test_every_trainable_parameter_gets_a_gradient_as_data_parallel_training_requires(par, p):
    """DDP fails on a trainable parameter without a gradient; for p = inf s̃ gets an exact zero."""
    model = injected(NBLoRAConfig(rank=2, p=p, delta=0.5, target_modules=ATTN, parameterization=par))
    model(*inputs()).square().mean().backward()
    missing = [n for n, t in model.named_parameters() if t.requires_grad and t.grad is None]
    assert missing == []
    if math.isinf(p):
        assert all(
            torch.equal(t.grad, torch.zeros_like(t))
            for n, t in model.named_parameters()
            if n.endswith(".nblora_s")
        )


def test_batched_pass_runs_one_cayley_per_group_of_layers(cayley_calls):
    model = injected(CONFIGS[0])
    model(*inputs())
    # (L, q, r), one call per layer shape: to_q/to_out (8 -> 8) x 4 layers, to_k/to_v (6 -> 8) x 4,
    # context_proj (8 -> 6, the same q = 14 split the other way), block 2: 24 and 18
    assert sorted(cayley_calls) == sorted([(4, 16, 3), (4, 14, 3), (1, 14, 3), (2, 24, 3), (2, 18, 3)])


def test_each_group_is_stored_as_one_tensor_per_name_with_one_gradient():
    """The layers of one group are rows of one stored tensor per name (Ã, B̃, s̃), which the batched pass
    reads as it is: one gradient per group and name, contiguous, which autograd and the optimizer take as
    they are (per-layer tensors cost a stack, a gradient view and an optimizer update each)."""
    model = injected(CONFIGS[0])
    model(*inputs()).square().sum().backward()
    trainable = [(n, t) for n, t in model.named_parameters() if "nblora_" in n]
    groups = {(layer.batch_key(), layer._home[0]) for _, layer in nblora_layers(model)}
    assert len({key for key, _ in groups}) == len(groups) == 5 and len(trainable) == 3 * 5
    for name, t in trainable:
        assert name.startswith("nblora_stacks.") and t.grad.shape == t.shape and t.grad.is_contiguous()
    storages = defaultdict(set)
    for _, layer in nblora_layers(model):
        group, row = layer._home
        for name in ("nblora_A", "nblora_B", "nblora_s", "nblora_delta"):
            assert torch.equal(getattr(layer, name), getattr(group, name)[row])
            storages[id(group), name].add(getattr(layer, name).untyped_storage().data_ptr())
    assert all(len(ptrs) == 1 for ptrs in storages.values())


def test_no_grad_forward_fills_and_then_reuses_the_cache_in_batches(cayley_calls):
    model = injected(CONFIGS[1]).eval()
    calls = cayley_calls
    x, context = inputs()
    with torch.no_grad():
        first = model(x, context)
        n_first = len(calls)
        assert torch.equal(model(x, context), first)
    assert n_first > 0 and len(calls) == n_first
    with torch.no_grad():  # a change to one adapter refreshes the stale caches in the next batched pass
        model.blocks[0].to_q.nblora_d.add_(0.1)
        model(x, context)
    assert len(calls) > n_first


def test_training_step_then_inference_sees_the_new_weights():
    model = injected(CONFIGS[0])
    plain = per_layer_copy(model)
    x, context = inputs()
    with torch.no_grad():
        model(x, context)  # fills the caches
    for m in (model, plain):
        opt = torch.optim.Adam([t for n, t in m.named_parameters() if "nblora_" in n], lr=0.1)
        m(x, context).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert torch.allclose(model(x, context), plain(x, context), atol=1e-12)


# -- merge, scale, unload --------------------------------------------------------------------------
def test_forward_equals_merged_unmerged_and_unloaded_for_a_model():
    model = injected(CONFIGS[0])
    x, context = inputs()
    with torch.no_grad():
        expected = model(x, context)
        merge_nblora(model)
        merged = model(x, context)
        unmerge_nblora(model)
        unmerged = model(x, context)
        unload_nblora(model)
        unloaded = model(x, context)
    assert not any(isinstance(m, NBLoRALinear) for m in model.modules())
    assert "forward" not in model.__dict__ and not hasattr(model, inject_module.MATERIALIZER_ATTR)
    for y in (merged, unmerged, unloaded):
        assert torch.allclose(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_merge_slider_and_unmerge_give_the_base_weights_back_exactly(dtype):
    """W + ΔW − ΔW does not round back to W in fp16/bf16: the layer keeps a copy of W while merged (the
    LLM/ViT path, core merge/unmerge, and the diffusion pipeline's share it)."""
    model = injected(CONFIGS[0], dtype=dtype)
    base = {name: layer.base_layer.weight.clone() for name, layer in nblora_layers(model)}
    merge_nblora(model)
    assert any(not torch.equal(layer.base_layer.weight, base[n]) for n, layer in nblora_layers(model))
    set_nblora_scale(model, 0.5)  # merged layers unmerge and re-merge themselves
    set_nblora_scale(model, 2.0)
    unmerge_nblora(model)
    for name, layer in nblora_layers(model):
        assert torch.equal(layer.base_layer.weight, base[name]), name
        assert layer._base_copy is None  # nothing kept once unmerged
    layer = next(layer for _, layer in nblora_layers(model))
    layer.merge(keep_base=False)  # asked not to keep a copy: unmerge subtracts
    assert layer._base_copy is None
    layer.unmerge()


def test_unload_without_merge_gives_back_the_base_model():
    torch.manual_seed(0)
    base = TinyNet()
    model = copy.deepcopy(base)
    inject_nblora(model, CONFIGS[1])
    randomize_adapters(model)
    merge_nblora(model)
    unload_nblora(model, merge=False)
    x, context = inputs()
    with torch.no_grad():
        assert torch.allclose(model(x, context), base(x, context), rtol=0, atol=1e-12)


def test_scale_zero_gives_the_base_model_and_scale_is_linear():
    torch.manual_seed(0)
    base = TinyNet()
    model = copy.deepcopy(base)
    inject_nblora(model, NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=("to_out.0",)))
    randomize_adapters(model)
    x, context = inputs()
    with torch.no_grad():
        full = model(x, context)
        set_nblora_scale(model, 0.0)
        assert torch.equal(model(x, context), base(x, context))
        set_nblora_scale(model, 1.0)
        assert torch.equal(model(x, context), full)


@pytest.fixture
def bf16_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield Accelerator(mixed_precision="bf16", cpu=True)
    AcceleratorState._reset_state(True)


def test_wrapped_forward_survives_accelerate_autocast_and_unwrap(bf16_accelerator, cayley_calls):
    """accelerate re-binds ``model.forward.__func__`` to the model, for autocast and again in unwrap_model."""
    model = injected(CONFIGS[0], dtype=torch.float32)
    x, context = inputs(torch.float32)
    with torch.no_grad():
        expected = model(x, context)
    prepared = bf16_accelerator.prepare(model)
    with torch.no_grad():
        assert prepared(x, context).dtype == torch.float32  # autocast inside, outputs converted back
    plain = bf16_accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    cayley_calls.clear()
    with torch.no_grad():
        assert torch.allclose(plain(x, context), expected, rtol=0, atol=1e-5)
    assert len(cayley_calls) == 5  # still the same batched groups of layers


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["II", "I"])
def test_slider_moves_in_eval_mode_reuse_the_cached_factors(config, cayley_calls):
    """The eval-mode cache holds the factors without the slider: a move costs no Cayley, and the cached
    path agrees with the batched training-mode pass, which applies the slider on the stacks."""
    model = injected(config).eval()
    x, context = inputs()
    with torch.no_grad():
        model(x, context)
        filled = len(cayley_calls)
        set_nblora_scale(model, 0.5)
        cached = model(x, context)
        assert len(cayley_calls) == filled
        model.train()  # no cache: the stacked pass with the slider, under no_grad
        assert torch.allclose(model(x, context), cached, rtol=0, atol=100 * torch.finfo(x.dtype).eps)
        set_nblora_scale(model, 1.0)
        assert not torch.allclose(model(x, context), cached)  # the slider does move the output
