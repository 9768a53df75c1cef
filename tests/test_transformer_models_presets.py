"""NB-LoRA on transformers LLaMA and ViT models: preset injection, relative bounds, training paths."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM, ViTForImageClassification

from nblora_diffusion.core import nblora_layers
from nblora_diffusion.core.bounds import schatten_norm
from nblora_diffusion.transformer_models import PRESETS, adapt_model, preset_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

LAYERS = 2  # tiny configs: 2 decoder / encoder blocks


def llama(path, **kw):
    return LlamaForCausalLM.from_pretrained(path, **kw)


def test_llama_preset_wraps_every_projection_of_every_block(llama_dir):
    model = llama(llama_dir)
    replaced = adapt_model(model, rank=2, delta=0.1, preset="llama")
    assert len(replaced) == 7 * LAYERS
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in replaced})
    assert suffixes == sorted(PRESETS["llama"])
    assert "lm_head" not in replaced


def test_auto_preset_reads_the_model_type(llama_dir, vit_dir):
    assert len(adapt_model(llama(llama_dir), rank=2, delta=0.1)) == 7 * LAYERS
    assert len(adapt_model(llama(llama_dir), rank=2, delta=0.1, preset="llama-attn")) == 4 * LAYERS
    vit = ViTForImageClassification.from_pretrained(vit_dir)
    replaced = adapt_model(vit, rank=2, delta=0.1)  # ViT: query and value only
    assert len(replaced) == 2 * LAYERS
    assert {name.rsplit(".", 1)[-1] for name in replaced} <= {"query", "value", "q_proj", "v_proj"}


def test_vit_all_preset_wraps_attention_and_mlp_but_not_the_head(vit_dir):
    vit = ViTForImageClassification.from_pretrained(vit_dir)
    replaced = adapt_model(vit, rank=2, delta=0.1, preset="vit-all")
    assert len(replaced) == 6 * LAYERS
    assert "classifier" not in replaced


def test_explicit_module_names_match_on_path_boundaries_only(llama_dir):
    model = llama(llama_dir)
    assert len(adapt_model(model, rank=2, delta=0.1, preset=["mlp.down_proj"])) == LAYERS
    with pytest.raises(ValueError, match="matches target_modules"):
        adapt_model(llama(llama_dir), rank=2, delta=0.1, preset=["proj"])  # a substring, not a module name


def test_relative_delta_is_gamma_times_each_base_weights_schatten_norm(llama_dir):
    for p in (1, 2, math.inf):
        model = llama(llama_dir)
        base = {
            n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith("_proj")
        }
        adapt_model(model, rank=2, p=p, gamma=0.3, preset="llama")
        deltas = {name: layer.delta for name, layer in nblora_layers(model)}
        assert len(deltas) == 7 * LAYERS
        expected = {n: 0.3 * float(schatten_norm(torch.linalg.svdvals(base[n]), p)) for n in deltas}
        assert len(set(round(v, 9) for v in expected.values())) > 1  # per layer, not one global δ
        for name in deltas:
            assert deltas[name] == pytest.approx(expected[name], rel=1e-5)


def test_only_adapter_parameters_are_trainable(llama_dir):
    model = llama(llama_dir)
    adapt_model(model, rank=2, delta=0.1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("nblora_") for n in trainable)


def test_preset_and_argument_errors_are_one_line_value_errors(llama_dir):
    model = llama(llama_dir)
    cases = [
        (dict(rank=2, delta=0.1, preset="gpt-9"), "unknown preset"),
        (dict(rank=2, delta=0.1, gamma=0.1), "exactly one of delta and gamma"),
        (dict(rank=0, delta=0.1), "rank"),
        (dict(rank=2, delta=0.1, preset=[]), "non-empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            adapt_model(model, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no preset for model type"):
        preset_config(rank=2, delta=0.1, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="either a config"):
        adapt_model(model, preset_config(rank=2, delta=0.1, preset="llama"), rank=3)


def _grads(model, ids):
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_adapter_gradients(llama_dir):
    model = llama(llama_dir)
    adapt_model(model, rank=3, p=2, gamma=0.5)
    with torch.no_grad():
        for _, layer in nblora_layers(model):  # away from the W = 0 init, so every gradient is non-trivial
            layer.nblora_B.normal_(std=0.3)
    model.train()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = _grads(model, ids)
    model.gradient_checkpointing_enable()  # transformers' default: non-reentrant
    checkpointed = _grads(model, ids)
    assert plain.keys() == checkpointed.keys() and len(plain) == 3 * len(model.nblora_stacks.groups)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_bf16_model_trains_float32_adapters_within_the_bound(llama_dir):
    model = llama(llama_dir, dtype=torch.bfloat16)
    adapt_model(model, rank=4, p=2, gamma=0.5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    opt = torch.optim.AdamW(trainable, lr=0.5, fused=True)  # fused: in-place updates, no version bump
    ids = (torch.arange(12) * 5 + 3).remainder(93).add(3).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
        assert after.dtype == torch.bfloat16
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        assert not torch.equal(after, before)  # the no-grad path sees the fused optimizer's update
        for _, layer in nblora_layers(model):
            sv = torch.linalg.svdvals(layer.delta_weight().double())
            assert float(schatten_norm(sv, 2)) <= layer.delta * (1 + 1e-5)
