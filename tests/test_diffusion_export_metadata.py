"""The kohya export's metadata as A1111 / ComfyUI / kohya tools read it, and the A1111 TE2 warning."""

import json
import logging

import pytest
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from nblora_diffusion.diffusion import (
    add_nblora,
    architecture,
    export_kohya_lora,
    load_pipeline,
    make_config,
    set_norm_bound,
)
from nblora_diffusion.testing import tiny_sd_path

# A1111's NetworkOnDisk.detect_version: "sdxl_" prefix -> SDXL, ss_v2 == "True" -> SD2, other metadata -> SD1
EXPECTED = {
    "sd1": {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_v_parameterization": "False"},
    "sd2": {"ss_base_model_version": "sd_v2", "ss_v2": "True", "ss_v_parameterization": "False"},
    "sd2-v": {"ss_base_model_version": "sd_v2_v", "ss_v2": "True", "ss_v_parameterization": "True"},
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": "False"},
}


def pipeline(kind: str):
    """The tiny SD1 or SDXL pipeline; "sd2" is SD1 with SD2's Linear transformer projections, "sd2-v"
    that with a v-prediction scheduler (as stable-diffusion-2-1 ships)."""
    pipe = load_pipeline(tiny_sd_path(sdxl=kind == "sdxl"))
    if kind.startswith("sd2"):
        pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": True})
    if kind == "sd2-v":
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type="v_prediction"
        )
    assert architecture(pipe) == kind.removesuffix("-v")
    return pipe


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_kohya_metadata_classes_each_architecture_as_kohya_does(tmp_path, kind):
    pipe = pipeline(kind)
    add_nblora(
        pipe,
        make_config(4, "inf", delta=0.5, parameterization="I"),
        make_config(2, 2, gamma=0.05, component="text_encoder"),
    )
    meta = metadata(export_kohya_lora(pipe, tmp_path / "k.safetensors"))
    assert all(isinstance(v, str) for v in meta.values())
    assert {k: meta[k] for k in EXPECTED[kind]} == EXPECTED[kind]
    assert meta["ss_resolution"] == "(64, 64)"  # the native size: the tiny models' 8x8 latents, x8 VAE
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "networks.lora",
        "4",
        "4",
    )
    assert (meta["nblora_p"], meta["nblora_delta"], meta["nblora_parameterization"]) == ("inf", "0.5", "I")
    assert "nblora_gamma" not in meta and meta["nblora_scale"] == "1.0"
    comps = json.loads(meta["nblora_components"])
    encoders = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]
    assert list(comps) == ["unet"] + encoders
    for name in encoders:  # the text encoders' own relative bound
        assert comps[name] == {
            "configs": [{"rank": 2, "p": 2.0, "gamma": 0.05, "parameterization": "II"}],
            "scale": 1.0,
        }


def test_kohya_metadata_records_a_relative_bound_the_slider_and_a_given_resolution(tmp_path):
    pipe = pipeline("sd1")
    add_nblora(pipe, make_config(3, 1.5, gamma=0.1))
    set_norm_bound(pipe, scale=0.5)  # the export holds the update at half its trained bound
    meta = metadata(export_kohya_lora(pipe, tmp_path / "k.safetensors", resolution=(768, 512)))
    assert (meta["nblora_p"], meta["nblora_gamma"], meta["nblora_scale"]) == ("1.5", "0.1", "0.5")
    assert "nblora_delta" not in meta and meta["ss_network_dim"] == "3"
    assert meta["ss_resolution"] == "(768, 512)"  # kohya's (width, height)
    assert metadata(export_kohya_lora(pipe, tmp_path / "s.safetensors", resolution=640))["ss_resolution"] == (
        "(640, 640)"
    )
    for bad in (0, (512,), (512, 0), 512.0, True):
        with pytest.raises(ValueError, match="resolution must be a positive int or"):
            export_kohya_lora(pipe, tmp_path / "bad.safetensors", resolution=bad)
    assert not (tmp_path / "bad.safetensors").exists()


def test_partial_te2_attention_warns_that_a1111_ignores_it_and_still_exports(tmp_path, caplog):
    pipe = pipeline("sdxl")
    te = make_config(2, 2, delta=0.3, component="text_encoder", target_modules=("q_proj", "v_proj"))
    add_nblora(pipe, make_config(4, "inf", delta=0.5), te)
    with caplog.at_level(logging.WARNING, logger="nblora_diffusion.diffusion.export"):
        path = export_kohya_lora(pipe, tmp_path / "xl.safetensors")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message
    assert "AUTOMATIC1111" in message and "text_encoder_2" in message
    assert "2 self-attention layer(s)" in message  # the tiny encoder has two layers
    assert "text_model.encoder.layers.0.self_attn: q_proj, v_proj" in message
    assert any(k.startswith("lora_te2_") for k in load_file(path))  # a warning, not an error


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd-partial", "sdxl-complete"])
def test_no_te2_warning_without_a_partial_second_encoder(tmp_path, caplog, sdxl):
    pipe = pipeline("sdxl" if sdxl else "sd1")
    targets = None if sdxl else ("q_proj", "v_proj")  # SD1 has no second encoder; SDXL: all four
    te = make_config(2, 2, delta=0.3, component="text_encoder", preset="wide", target_modules=targets)
    add_nblora(pipe, make_config(4, "inf", delta=0.5), te)
    with caplog.at_level(logging.WARNING, logger="nblora_diffusion.diffusion.export"):
        export_kohya_lora(pipe, tmp_path / "k.safetensors")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
