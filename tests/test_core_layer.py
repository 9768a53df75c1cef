"""NBLoRALinear: the bound by construction, init, merge paths, caching, scale and argument checks."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nblora_diffusion import NBLoRALinear
from nblora_diffusion.core.cayley import cayley

from layer_helpers import P_VALUES, PARAMETERIZATIONS, fresh_delta_weight, make_layer, norm_of, randomize, tol


# -- init and the three factors --------------------------------------------------------------------
@pytest.mark.parametrize("par", PARAMETERIZATIONS)
@pytest.mark.parametrize("p", P_VALUES)
def test_update_is_exactly_zero_at_init(par, p):
    layer = make_layer(m=12, n=9, r=4, p=p, par=par, dtype=torch.float32)
    assert torch.equal(layer.delta_weight(), torch.zeros(12, 9))
    x = torch.randn(3, 9)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_only_nblora_parameters_are_trainable_and_base_is_kept():
    base = nn.Linear(6, 4)
    layer = NBLoRALinear(base, 2, "inf", 1.0)
    assert layer.base_layer is base
    trainable = [n for n, t in layer.named_parameters() if t.requires_grad]
    assert trainable and all(n.startswith("nblora_") for n in trainable)


@pytest.mark.parametrize("par", PARAMETERIZATIONS)
@pytest.mark.parametrize("p", P_VALUES)
def test_forward_merged_unmerged_and_unloaded_agree(par, p):
    layer = randomize(make_layer(p=p, par=par))
    x = torch.randn(4, 5, dtype=torch.float64)
    W = layer.delta_weight().detach()
    expected = layer.base_layer(x) + x @ W.T
    outputs = {"forward": layer(x)}
    layer.merge()
    outputs["merged"] = layer(x)
    layer.unmerge()
    outputs["unmerged"] = layer(x)
    layer.merge()
    outputs["unloaded"] = layer.base_layer(x)  # what unload_nblora puts back
    for name, y in outputs.items():
        assert torch.allclose(y, expected, rtol=0, atol=tol(5, torch.float64)), name


def test_delta_weight_is_the_product_of_the_factors_2BtSA():
    layer = randomize(make_layer(m=8, n=6, r=3, p=2.0, par="II"))
    Q = cayley(torch.cat([layer.nblora_A.mT, layer.nblora_B.mT]))
    A, B = Q[:6].mT, Q[6:].mT  # (r, n), (r, m)
    s = layer.bound_vector()
    assert torch.allclose(layer.delta_weight(), 2 * B.mT @ torch.diag(s) @ A, atol=tol(8, torch.float64))


def test_parameterization_I_clamps_d_into_the_bound():
    layer = randomize(make_layer(m=8, n=6, r=3, p=math.inf, delta=0.5, par="I"), scale=5.0)
    sigma = torch.linalg.svdvals(layer.delta_weight().detach())
    assert torch.allclose(sigma[:3], torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-12)


# -- the bound after many large optimizer steps (paper Thm. 1) -------------------------------------
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@settings(max_examples=25, deadline=None)
@given(
    p=st.sampled_from(P_VALUES),
    par=st.sampled_from(PARAMETERIZATIONS),
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    r_gap=st.integers(0, 2),  # rank = min(m, n) - r_gap: includes full and near-full rank
    delta=st.floats(0.05, 5.0),
    autocast=st.sampled_from(list(AUTOCAST)),
    optimizer=st.sampled_from(list(OPTIMIZERS)),
    seed=st.integers(0, 2**16),
)
def test_delta_norm_within_bound_after_large_steps(p, par, m, n, r_gap, delta, autocast, optimizer, seed):
    r = max(1, min(m, n) - r_gap)
    layer = make_layer(m, n, r, p, delta, par, dtype=torch.float32, seed=seed)
    opt = OPTIMIZERS[optimizer](layer.parameters(), lr=1e-1)
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.autocast("cpu", dtype=AUTOCAST[autocast]) if AUTOCAST[autocast] else contextlib.nullcontext()
    drift = torch.randn(m, generator=gen) * 3  # a steady push outwards, plus fresh noise every step
    for _ in range(20):
        x = torch.randn(8, n, generator=gen)
        with ctx:
            loss = -(layer(x).float() * (drift + torch.randn(8, m, generator=gen))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    W = layer.delta_weight().detach()
    s = layer.bound_vector().detach()
    assert torch.isfinite(W).all()
    sigma = torch.linalg.svdvals(W.double())
    assert norm_of(W, p) <= delta * (1 + tol(max(m, n), torch.float32))
    assert float(sigma.max()) <= float(s.max()) * (1 + tol(max(m, n), torch.float32))


@pytest.mark.parametrize("par", PARAMETERIZATIONS)
def test_bound_is_reached_when_the_loss_pushes_outwards(par):
    """Maximising <W, R> drives W onto the boundary ‖W‖ = δ, never past it."""
    m, n, r, delta = 10, 8, 8, 2.0
    layer = make_layer(m, n, r, math.inf, delta, par, dtype=torch.float32)
    R = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-1)
    for _ in range(300):
        opt.zero_grad()
        (-(layer.delta_weight() * R).sum()).backward()
        opt.step()
    norm = norm_of(layer.delta_weight(), math.inf)
    assert 0.9 * delta < norm <= delta * (1 + tol(m, torch.float32))


# -- scale and caching -----------------------------------------------------------------------------
@pytest.mark.parametrize("par", PARAMETERIZATIONS)
def test_scale_multiplies_the_update_and_zero_gives_the_base_model(par):
    layer = randomize(make_layer(par=par))
    W = layer.delta_weight().detach()
    x = torch.randn(2, 5, dtype=torch.float64)
    layer.scale = 0.25
    assert torch.allclose(layer.delta_weight(), 0.25 * W, atol=1e-14)
    assert torch.allclose(layer.bound_vector(), 0.25 * layer.bound_vector_unscaled(), atol=1e-15)
    layer.merge()
    layer.scale = 0.5  # re-merges with the new scale
    assert torch.allclose(layer(x), layer.base_layer(x), atol=0)
    assert torch.allclose(
        layer.base_layer.weight - make_layer(par=par).base_layer.weight, 0.5 * W, atol=1e-12
    )
    layer.unmerge()
    layer.scale = 0.0
    assert torch.equal(layer(x), layer.base_layer(x))


def test_no_cayley_per_forward_when_parameters_did_not_change(cayley_calls):
    layer = randomize(make_layer()).eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        for _ in range(3):
            assert torch.equal(layer(x), first)
    assert len(cayley_calls) == 1


def test_adapter_made_under_inference_mode_works_and_never_serves_stale_factors():
    """Inference tensors track no version, so their factors are recomputed rather than cached."""
    with torch.inference_mode():
        layer = randomize(make_layer())
        x = torch.randn(3, 5, dtype=torch.float64)
        first = layer(x)
        assert torch.allclose(first, layer.base_layer(x) + x @ fresh_delta_weight(layer).T, atol=1e-12)
        layer.nblora_B.add_(0.5)  # an in-place change that bumps no version counter
        second = layer(x)
        assert torch.allclose(second, layer.base_layer(x) + x @ fresh_delta_weight(layer).T, atol=1e-12)
    assert not torch.allclose(first, second)


def test_no_grad_cache_is_invalidated_after_an_optimizer_step():
    layer = randomize(make_layer())
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
        expected = layer.base_layer(x) + x @ fresh_delta_weight(layer).T
    assert not torch.allclose(after, before)
    assert torch.allclose(after, expected, atol=1e-13)


@pytest.mark.parametrize("kwargs", [{"fused": True}, {"foreach": True}], ids=["fused", "foreach"])
def test_no_grad_cache_is_invalidated_after_a_fused_adamw_step(kwargs):
    """Fused AdamW updates parameters without bumping their version counters."""
    layer = randomize(make_layer(dtype=torch.float32))
    x = torch.randn(3, 5)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, **kwargs)
    for _ in range(2):
        with torch.no_grad():
            layer(x)  # fills the cache
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            expected = layer.base_layer(x) + x @ fresh_delta_weight(layer).T
            assert torch.allclose(layer(x), expected, atol=1e-5)


def test_cache_follows_in_place_loads_of_new_values():
    layer = randomize(make_layer())
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        randomize(layer, seed=7)
        expected = layer.base_layer(x) + x @ fresh_delta_weight(layer).T
        assert torch.allclose(layer(x), expected, atol=1e-13)


def test_dropout_applies_only_in_training():
    torch.manual_seed(0)
    layer = randomize(NBLoRALinear(nn.Linear(5, 7).double(), 3, 2, 1.5, dropout=0.5))
    x = torch.randn(64, 5, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


# -- bad arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "got 0"),
        ({"rank": 6}, r"min\(out, in\) = 5\], got 6"),
        ({"rank": 2.0}, "got 2.0"),
        ({"p": 0.5}, "got 0.5"),
        ({"p": "two"}, "'two'"),
        ({"delta": 0.0}, "got 0.0"),
        ({"delta": -1.0}, "got -1.0"),
        ({"delta": math.inf}, "got inf"),
        ({"parameterization": "III"}, "'III'"),
        ({"dropout": 1.0}, "got 1.0"),
    ],
)
def test_bad_layer_arguments_raise_value_error_naming_the_value(kwargs, message):
    args = {"rank": 2, "p": 2.0, "delta": 1.0, "parameterization": "II", "dropout": 0.0} | kwargs
    with pytest.raises(ValueError, match=message):
        NBLoRALinear(nn.Linear(5, 7), **args)


def test_non_linear_base_layer_is_rejected_by_type_name():
    with pytest.raises(ValueError, match="Conv2d"):
        NBLoRALinear(nn.Conv2d(3, 3, 1), 1, 2.0, 1.0)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_bad_scale_is_rejected(value):
    layer = make_layer()
    with pytest.raises(ValueError, match="scale must be"):
        layer.scale = value


def test_merge_twice_and_unmerge_unmerged_raise():
    layer = make_layer()
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
