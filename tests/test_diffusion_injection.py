"""Injection into Stable Diffusion UNets and CLIP text encoders: counts, presets, exactness at W = 0."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from nblora_diffusion.core import NBLoRALinear, nblora_layers
from nblora_diffusion.diffusion import (
    TARGET_PRESETS,
    add_nblora,
    architecture,
    load_pipeline,
    make_config,
    preset_targets,
)
from nblora_diffusion.testing import tiny_sd_path

from sd_helpers import images, perturb

# Public architecture configs (values written here; weights never downloaded)
SD15_UNET = dict(
    sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
SD21_UNET = dict(
    SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)
SDXL_UNET = dict(
    sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280)  # fmt: skip


def meta_pipeline(unet_cfg: dict, sdxl: bool = False) -> SimpleNamespace:
    """The real architectures on the meta device: module structure without memory or init time."""
    with init_empty_weights():
        parts = {
            "unet": UNet2DConditionModel(**unet_cfg),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        }
        if sdxl:
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    return SimpleNamespace(**parts)


def counts(replaced: dict[str, list[str]]) -> dict[str, int]:
    return {k: len(v) for k, v in replaced.items()}


def test_sd15_unet_has_128_attention_projections_and_clip_l_48():
    pipe = meta_pipeline(SD15_UNET)
    assert architecture(pipe) == "sd1"
    replaced = add_nblora(
        pipe, make_config(4, "inf", delta=1.0), make_config(4, 2, delta=1.0, component="text_encoder")
    )
    assert counts(replaced) == {"unet": 128, "text_encoder": 48}
    assert all(isinstance(pipe.unet.get_submodule(n), NBLoRALinear) for n in replaced["unet"])


def test_wide_preset_skips_sd1_conv_projections_and_wraps_sd2_linear_ones():
    sd1, sd2 = meta_pipeline(SD15_UNET), meta_pipeline(SD21_UNET)
    assert architecture(sd2) == "sd2"
    wide = make_config(4, "inf", delta=1.0, preset="wide")
    r1, r2 = add_nblora(sd1, wide)["unet"], add_nblora(sd2, wide)["unet"]
    assert len(r1) == 128 + 32  # + ff.net.0.proj and ff.net.2 of 16 transformer blocks
    assert not any(n.endswith(("proj_in", "proj_out")) for n in r1)  # Conv2d in SD1.x: skipped
    assert isinstance(sd1.unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)
    assert len(r2) == 128 + 32 + 32  # + Linear proj_in / proj_out of 16 Transformer2DModels


def test_sdxl_counts_cover_both_text_encoders():
    pipe = meta_pipeline(SDXL_UNET, sdxl=True)
    assert architecture(pipe) == "sdxl"
    te = make_config(4, 2, delta=1.0, component="text_encoder")
    replaced = add_nblora(pipe, make_config(4, "inf", delta=1.0), te)
    # 70 transformer blocks × 2 attentions × 4 projections; CLIP-L 12 layers, OpenCLIP bigG 32 layers × 4
    assert counts(replaced) == {"unet": 560, "text_encoder": 48, "text_encoder_2": 128}
    wide = add_nblora(meta_pipeline(SDXL_UNET, sdxl=True), make_config(4, "inf", delta=1.0, preset="wide"))
    assert len(wide["unet"]) == 560 + 140 + 22  # + 2 ff per block + proj_in/out of 11 Transformer2DModels


@pytest.mark.parametrize("arch", sorted(TARGET_PRESETS))
def test_arch_presets_name_only_linear_layers(arch):
    cfg = {"sd1": SD15_UNET, "sd2": SD21_UNET, "sdxl": SDXL_UNET}[arch]
    pipe = meta_pipeline(cfg, sdxl=arch == "sdxl")
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for preset in ("attn", "wide"):
            targets = preset_targets(preset, component, arch)
            hits = [
                m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)
            ]
            assert hits and all(type(m) is torch.nn.Linear for m in hits), (arch, component, preset)


def test_injecting_twice_or_matching_nothing_is_an_error():
    pipe = meta_pipeline(SD15_UNET)
    add_nblora(pipe, make_config(4, "inf", delta=1.0))
    with pytest.raises(ValueError, match="already has an NB-LoRA adapter"):
        add_nblora(pipe, make_config(4, "inf", delta=1.0))
    with pytest.raises(ValueError, match="no nn.Linear module"):
        add_nblora(pipe, make_config(4, "inf", delta=1.0, target_modules=("not_a_module",)))
    with pytest.raises(ValueError, match="preset must be one of"):
        make_config(4, "inf", preset="everything")


def test_failed_text_encoder_injection_rolls_back_the_unet():
    pipe = load_pipeline(tiny_sd_path())
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    too_big = make_config(64, "inf", delta=1.0, component="text_encoder")  # tiny CLIP is 32 wide
    with pytest.raises(ValueError, match="rank must be"):
        add_nblora(pipe, make_config(4, "inf", delta=1.0), too_big)
    assert not list(nblora_layers(pipe.unet)) and not list(nblora_layers(pipe.text_encoder))
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("parameterization", ["I", "II"])
def test_zero_update_pipeline_equals_base_bit_for_bit(sdxl, parameterization):
    pipe = load_pipeline(tiny_sd_path(sdxl=sdxl))
    base = images(pipe)
    unet = make_config(4, "inf", delta=0.5, preset="wide", parameterization=parameterization)
    add_nblora(
        pipe, unet, make_config(2, 2, gamma=0.2, component="text_encoder", parameterization=parameterization)
    )
    assert torch.equal(images(pipe), base)
    perturb(pipe)
    assert (images(pipe) - base).abs().max() > 1e-3  # the adapters are live


def test_attention_processors_are_kept_and_agree():
    pipe = load_pipeline(tiny_sd_path())
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    add_nblora(pipe, make_config(4, "inf", delta=0.5))
    perturb(pipe)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA
    sdpa = images(pipe)
    pipe.unet.set_attn_processor(AttnProcessor())  # classic bmm attention
    classic = images(pipe)
    assert torch.allclose(sdpa, classic, atol=1e-4)
    assert all(isinstance(layer, NBLoRALinear) for _, layer in nblora_layers(pipe.unet))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers attention needs a CUDA device")
def test_xformers_attention_runs_with_adapters():
    pytest.importorskip("xformers")
    pipe = load_pipeline(tiny_sd_path(), device="cuda")
    add_nblora(pipe, make_config(4, "inf", delta=0.5))
    perturb(pipe)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    sdpa = images(pipe).cpu()
    pipe.enable_xformers_memory_efficient_attention()
    assert torch.allclose(images(pipe).cpu(), sdpa, atol=1e-3)


def test_adapters_are_materialised_once_not_per_denoising_step(cayley_calls):
    pipe = load_pipeline(tiny_sd_path())
    add_nblora(pipe, make_config(4, "inf", delta=0.5), make_config(2, 2, delta=0.3, component="text_encoder"))
    perturb(pipe)
    calls = cayley_calls
    images(pipe, steps=4)
    first = len(calls)
    # each (shape) group transformed once, all in the first forward of each model
    assert 0 < first <= len({s for s in calls})
    images(pipe, steps=4)
    assert len(calls) == first  # cached: the second generation runs no Cayley at all
