"""DP merging: the a-priori Frobenius bound, the noise scale σ·B, the merged bound, LoRA projection."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nblora_diffusion import NBLoRALinear
from nblora_diffusion.core import NBLoRAConfig, inject_nblora, nblora_layers, unload_nblora
from nblora_diffusion.core.bounds import schatten_norm
from nblora_diffusion.transformer_models import (
    LayerUpdate,
    adapt_model,
    adapter_updates,
    dp_merge,
    frobenius_bound,
    lora_updates,
    make_tiny_llama,
    nblora_updates,
    project_update,
    save_model_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

P_VALUES = [1.0, 1.5, 2.0, 3.0, 6.0, math.inf]


def random_layer(m, n, r, p, delta, par, seed, scale=3.0) -> NBLoRALinear:
    torch.manual_seed(seed)
    layer = NBLoRALinear(nn.Linear(n, m).double(), r, p, delta, par)
    with torch.no_grad():
        for t in layer.parameters(recurse=False):
            t.normal_(std=scale)  # large, arbitrary parameters: the bound must hold anyway
    return layer


def test_frobenius_bound_formula():
    assert frobenius_bound(1, 2.0, 8) == 2.0
    assert frobenius_bound(2, 2.0, 8) == 2.0
    assert frobenius_bound("inf", 2.0, 9) == pytest.approx(6.0)
    assert frobenius_bound(4, 2.0, 16) == pytest.approx(2.0 * 16**0.25)
    with pytest.raises(ValueError, match="rank"):
        frobenius_bound(2, 1.0, 0)
    with pytest.raises(ValueError, match="norm p"):
        frobenius_bound(0.5, 1.0, 2)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 9),
    n=st.integers(2, 9),
    r=st.integers(1, 4),
    p=st.sampled_from(P_VALUES),
    delta=st.floats(0.05, 20.0),
    par=st.sampled_from(["I", "II"]),
    seed=st.integers(0, 10_000),
)
def test_every_nblora_update_lies_within_its_frobenius_bound(m, n, r, p, delta, par, seed):
    r = min(r, m, n)
    layer = random_layer(m, n, r, p, delta, par, seed)
    with torch.no_grad():
        W = layer.delta_weight()
    bound = frobenius_bound(p, delta, r)
    assert float(torch.linalg.matrix_norm(W)) <= bound * (1 + 1e-9)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("par", ["I", "II"])
def test_frobenius_bound_is_attained(p, par):
    """Tight: rank 1 at σ_1 = δ for p <= 2, r equal singular values δ·r^(-1/p) for p > 2."""
    m, n, r, delta = 9, 7, 4, 1.7
    layer = random_layer(m, n, r, p, delta, par, seed=0)
    U, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))
    if p <= 2:
        sigma = torch.tensor([delta] + [0.0] * (r - 1), dtype=torch.float64)
    else:
        sigma = torch.full((r,), delta * r ** (-1 / p), dtype=torch.float64)
    assert float(schatten_norm(sigma, p)) == pytest.approx(delta)
    layer.set_delta_weight((U * sigma) @ V.mT)
    with torch.no_grad():
        achieved = float(torch.linalg.matrix_norm(layer.delta_weight()))
    assert achieved == pytest.approx(frobenius_bound(p, delta, r), rel=1e-6)


def updates_for(shape, K, bound, seed):
    """K updates on the boundary of the Frobenius ball of radius `bound`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(K):
        W = torch.randn(shape, generator=g, dtype=torch.float64)
        out.append({"lin": LayerUpdate(W * (bound / torch.linalg.matrix_norm(W)), bound)})
    return out


def test_dp_merge_noise_std_equals_sigma_times_bound():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(300, 200).double())
    base = model.lin.weight.detach().clone()
    K, B, sigma = 3, 2.5, 0.4
    updates = updates_for((200, 300), K, B, seed=1)
    report = dp_merge(model, updates, sigma, generator=torch.Generator().manual_seed(2))
    mean = sum(u["lin"].weight for u in updates) / K
    noise = model.lin.weight.detach() - base - mean  # σ·B·η
    assert report.noise_std["lin"] == pytest.approx(sigma * B)
    # 60,000 samples: the std estimate is within 1% with overwhelming probability
    assert float(noise.std()) == pytest.approx(sigma * B, rel=0.01)
    assert abs(float(noise.mean())) < 5 * sigma * B / math.sqrt(noise.numel())
    assert report.mu == pytest.approx(1 / (K * sigma)) and report.mu <= 1 / sigma
    assert report.mu_replace == pytest.approx(2 / (K * sigma))


def test_dp_merge_without_noise_adds_the_mean_which_stays_within_the_bound():
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(30, 20).double())
    base = model.lin.weight.detach().clone()
    updates = updates_for((20, 30), 4, 1.5, seed=3)
    report = dp_merge(model, updates, sigma=0.0)
    mean = sum(u["lin"].weight for u in updates) / 4
    torch.testing.assert_close(model.lin.weight.detach(), base + mean, rtol=0, atol=1e-12)
    assert report.mean_update_norm["lin"] <= report.layer_bounds["lin"] == 1.5
    assert report.mu == math.inf


def test_model_scope_uses_the_joint_bound_and_layer_scope_each_layers_bound():
    def model():
        seq = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20)).double()
        return seq

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    updates = [
        {
            "0": LayerUpdate(torch.zeros(30, 40, dtype=torch.float64), 3.0),
            "1": LayerUpdate(torch.zeros(20, 30, dtype=torch.float64), 4.0),
        }
        for _ in range(2)
    ]
    joint = dp_merge(model(), updates, sigma=0.5, generator=g)
    assert joint.bound == pytest.approx(5.0)  # √(3² + 4²)
    assert joint.noise_std == {"0": pytest.approx(2.5), "1": pytest.approx(2.5)}
    assert joint.mu == pytest.approx(1 / (2 * 0.5))
    per_layer = dp_merge(model(), updates, sigma=0.5, scope="layer", generator=g)
    assert per_layer.noise_std == {"0": pytest.approx(1.5), "1": pytest.approx(2.0)}
    assert per_layer.mu == pytest.approx(math.sqrt(2) / (2 * 0.5))  # composition over 2 layers


def test_nblora_updates_carry_the_bound_of_their_layer():
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    inject_nblora(model, NBLoRAConfig(rank=3, p="inf", delta=0.7, target_modules=("0", "2")))
    updates = nblora_updates(model)
    assert set(updates) == {"0", "2"}
    for u in updates.values():
        assert u.bound == pytest.approx(0.7 * math.sqrt(3))
        assert float(torch.linalg.matrix_norm(u.weight)) <= u.bound


def test_plain_lora_updates_are_projected_onto_the_ball():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, t in peft_model.named_parameters():
            if "lora_" in name:
                t.normal_(std=2.0)  # far outside any small ball
    for p, delta in ((2, 0.5), (1, 0.8), ("inf", 0.3)):
        updates = lora_updates(peft_model, p, delta)
        assert set(updates) == {"0", "2"}
        for name, u in updates.items():
            raw = peft_model.base_model.model.get_submodule(name).get_delta_weight("default")
            sv = torch.linalg.svdvals(u.weight.double())
            assert float(schatten_norm(sv, float(p))) <= delta * (1 + 1e-6)
            assert u.bound == pytest.approx(frobenius_bound(p, delta, 4))
            if p == 2:  # the Euclidean projection onto a Frobenius ball is a rescaling
                torch.testing.assert_close(u.weight, raw * (delta / torch.linalg.matrix_norm(raw)))
    inside = project_update(torch.eye(3) * 0.1, 2, 1.0)
    torch.testing.assert_close(inside.weight, torch.eye(3) * 0.1)  # already inside: unchanged


def test_dp_merge_of_two_subject_adapters_on_a_diffusion_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    config = NBLoRAConfig(rank=2, p=2, delta=0.3, target_modules=("to_q", "to_k", "to_v", "to_out.0"))
    subjects = []
    for seed in (1, 2):  # two subjects' adapters, trained separately (here: random points in the ball)
        inject_nblora(unet, config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in unet.named_parameters():
                if name.rsplit(".", 1)[-1].startswith("nblora_"):
                    t.copy_(torch.randn(t.shape, generator=g))
        subjects.append(nblora_updates(unet))
        unload_nblora(unet, merge=False)
    base = {n: m.weight.detach().clone() for n, m in unet.named_modules() if n in subjects[0]}
    report = dp_merge(unet, subjects, sigma=0.0)
    assert report.num_adapters == 2 and len(base) == len(subjects[0]) > 0
    for name, W0 in base.items():
        mean = (subjects[0][name].weight + subjects[1][name].weight) / 2
        torch.testing.assert_close(unet.get_submodule(name).weight.detach(), W0 + mean)
        assert report.mean_update_norm[name] <= 0.3 * (1 + 1e-6)


def test_dp_merge_rejects_bad_input_with_one_line_errors():
    model = nn.Sequential(nn.Linear(4, 3))
    ok = [{"0": LayerUpdate(torch.zeros(3, 4), 1.0)}]
    cases = [
        (dict(updates=ok, sigma=-1.0), "sigma"),
        (dict(updates=ok, sigma=float("nan")), "sigma"),
        (dict(updates=[], sigma=1.0), "at least one"),
        (dict(updates=ok, sigma=1.0, scope="global"), "scope"),
        (dict(updates=[{"9": LayerUpdate(torch.zeros(3, 4), 1.0)}], sigma=1.0), "no module"),
        (dict(updates=[{"0": LayerUpdate(torch.zeros(4, 4), 1.0)}], sigma=1.0), "does not fit"),
    ]
    before = model[0].weight.detach().clone()
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            dp_merge(model, **kwargs)
        assert "\n" not in str(err.value)
    assert torch.equal(model[0].weight, before)  # nothing applied on bad input
    inject_nblora(model, NBLoRAConfig(rank=1, delta=1.0, target_modules=("0",)))
    with pytest.raises(ValueError, match="plain nn.Linear"):
        dp_merge(model, ok, sigma=1.0)


def test_dp_merge_of_saved_llm_adapters_from_separate_data(tmp_path):
    from transformers import LlamaForCausalLM

    base_dir = make_tiny_llama(tmp_path / "base")
    folders = []
    for k in range(3):  # three adapters "trained" on separate data: random points of the bounded set
        model = LlamaForCausalLM.from_pretrained(base_dir)
        adapt_model(model, rank=2, p=2, gamma=0.5, preset="llama-attn")
        with torch.no_grad():
            for _, layer in nblora_layers(model):
                for t in layer.parameters(recurse=False):
                    t.normal_(generator=torch.Generator().manual_seed(k))
        folders.append(save_model_adapter(model, tmp_path / f"adapter{k}"))
    model = LlamaForCausalLM.from_pretrained(base_dir)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    updates = [adapter_updates(model, folder) for folder in folders]
    assert not list(nblora_layers(model))  # the base model is left as it was
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    report = dp_merge(model, updates, sigma=0.0)
    assert len(report.layer_bounds) == 4 * 2
    for name, bound in report.layer_bounds.items():
        W0 = base[f"{name}.weight"]
        mean = sum(u[name].weight for u in updates) / 3
        torch.testing.assert_close(model.get_submodule(name).weight.detach(), W0 + mean)
        assert bound == pytest.approx(0.5 * float(torch.linalg.matrix_norm(W0)), rel=1e-5)  # p = 2: B = δ
        assert report.mean_update_norm[name] <= bound * (1 + 1e-5)
    adapt_model(model, rank=2, delta=0.1, preset="llama-attn")
    with pytest.raises(ValueError, match="already has NB-LoRA adapters"):
        adapter_updates(model, folders[0])
