"""Plain-LoRA round trips: diffusers and kohya exports through stock diffusers loaders, and imports."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file

from nblora_diffusion.core import matrix_schatten_norm, nblora_layers, nblora_state_dict
from nblora_diffusion.diffusion import (
    add_nblora,
    export_diffusers_lora,
    export_kohya_lora,
    import_lora,
    load_pipeline,
    make_config,
    set_norm_bound,
)
from nblora_diffusion.testing import tiny_sd_path

from sd_helpers import images, perturb

TOL = 1e-4  # fp32 max abs pixel difference between our loader and stock diffusers


def adapted(sdxl: bool = False, rank: int = 4, delta: float = 0.5):
    pipe = load_pipeline(tiny_sd_path(sdxl=sdxl))
    te = make_config(2, 2, delta=0.3, component="text_encoder")
    add_nblora(pipe, make_config(rank, "inf", delta=delta, preset="wide"), te)
    perturb(pipe)
    return pipe


def stock(sdxl: bool = False):
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    return cls.from_pretrained(tiny_sd_path(sdxl=sdxl))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_diffusers_export_loads_in_stock_pipeline_with_same_images(tmp_path, sdxl):
    pipe = adapted(sdxl)
    ours = images(pipe)
    path = export_diffusers_lora(pipe, tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    prefixes = {k.split(".")[0] for k in load_file(path)}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if sdxl else {"unet", "text_encoder"})
    plain = stock(sdxl)
    base = images(plain)
    plain.load_lora_weights(tmp_path)
    assert (images(plain) - ours).abs().max() <= TOL
    assert (ours - base).abs().max() > 100 * TOL  # the comparison is not vacuous


def test_stock_lora_weight_w_equals_slider_at_w_times_delta(tmp_path):
    pipe = adapted()
    export_diffusers_lora(pipe, tmp_path)
    plain = stock()
    plain.load_lora_weights(tmp_path, adapter_name="nb")
    for w in (0.0, 0.4, 1.3):
        plain.set_adapters(["nb"], adapter_weights=[w])
        set_norm_bound(pipe, delta_prime=w * 0.5)
        assert (images(plain) - images(pipe)).abs().max() <= TOL, w


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_kohya_export_keys_load_through_diffusers_kohya_converter(tmp_path, sdxl):
    pipe = adapted(sdxl)
    ours = images(pipe)
    path = export_kohya_lora(pipe, tmp_path / "nb_kohya.safetensors")
    sd = load_file(path)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" if not sdxl else \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # fmt: skip
    assert sd[f"{key}.lora_down.weight"].shape[0] == 4 and float(sd[f"{key}.alpha"]) == 4.0
    te = ("lora_te1_", "lora_te2_") if sdxl else ("lora_te_",)
    assert {k.split("text_model")[0] for k in sd if not k.startswith("lora_unet_")} == set(te)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    plain = stock(sdxl)
    plain.load_lora_weights(str(path))
    assert (images(plain) - ours).abs().max() <= TOL


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_import_of_an_in_bound_lora_reproduces_the_adapter(tmp_path, fmt):
    source = adapted()
    ours = images(source)
    path = export_diffusers_lora(source, tmp_path) if fmt == "diffusers" else \
        export_kohya_lora(source, tmp_path / "k.safetensors")  # fmt: skip
    target = load_pipeline(tiny_sd_path())
    add_nblora(
        target,
        make_config(4, "inf", delta=0.5, preset="wide"),
        make_config(2, 2, delta=0.3, component="text_encoder"),
    )
    report = import_lora(target, path, project=False)
    assert report["layers"] == 70 + 8 and report["clipped"] == 0 and not report["unmatched"]
    assert report["max_relative_change"] < 1e-9
    assert (images(target) - ours).abs().max() <= TOL


def test_import_projects_onto_a_smaller_bound_and_reports_clipping(tmp_path):
    path = export_kohya_lora(adapted(rank=4, delta=0.5), tmp_path / "k.safetensors")
    target = load_pipeline(tiny_sd_path())
    add_nblora(target, make_config(2, 1, delta=0.2))  # lower rank, nuclear-norm bound, attention only
    before = {k: v.clone() for k, v in nblora_state_dict(target.unet).items()}
    with pytest.raises(ValueError, match="pass project=True"):
        import_lora(target, path, project=False)
    after = nblora_state_dict(target.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)  # all layers or none
    report = import_lora(target, path, project=True)
    assert report["layers"] == 56 and report["clipped"] == 56 and 0 < report["max_relative_change"] < 1
    assert len(report["unmatched"]) == 14 + 8  # ff layers and text encoder: no adapter there
    with torch.no_grad():
        for _, layer in nblora_layers(target.unet):
            assert float(matrix_schatten_norm(layer.delta_weight(), 1)) <= 0.2 * (1 + 1e-5)


def test_import_of_a_peft_lora_trained_with_alpha_matches_stock_diffusers(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    plain = stock()
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    torch.manual_seed(0)
    plain.unet.add_adapter(cfg)
    expected = images(plain)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(plain.unet),
        unet_lora_adapter_metadata=plain.unet.peft_config["default"].to_dict(),
    )  # fmt: skip
    target = load_pipeline(tiny_sd_path())
    add_nblora(target, make_config(4, "inf", delta=1e3))
    report = import_lora(target, tmp_path, project=False)  # alpha / r = 2 applied
    assert report["layers"] == 56 and report["clipped"] == 0
    assert (images(target) - expected).abs().max() <= TOL


def test_import_and_export_refuse_bad_inputs(tmp_path):
    pipe = load_pipeline(tiny_sd_path())
    with pytest.raises(ValueError, match="no NB-LoRA adapters"):
        export_diffusers_lora(pipe, tmp_path)
    with pytest.raises(ValueError, match="add_nblora first"):
        import_lora(pipe, tmp_path)
    add_nblora(pipe, make_config(4, "inf", delta=0.5))
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_kohya_lora(pipe, tmp_path / "k.bin")
    with pytest.raises(ValueError, match="LoRA file not found"):
        import_lora(pipe, tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        import_lora(pipe, bad)
    from safetensors.torch import save_file

    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match="unrecognised LoRA keys"):
        import_lora(pipe, bad)
    xl = export_kohya_lora(adapted(sdxl=True), tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="do not fit the layer"):  # an SDXL file on an SD1 pipeline
        import_lora(pipe, xl)
