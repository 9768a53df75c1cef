"""Single-file checkpoints (the original LDM / A1111 key layout) load offline through load_pipeline to the
same images as the diffusers folder they were made from; every bad file is a one-line ValueError."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nblora_diffusion.diffusion import load_pipeline
from nblora_diffusion.diffusion import single_file as sf
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.testing.ldm_layout import save_ldm_checkpoint

from sd_helpers import images


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network at all (a connection attempt fails the test), and a private cache folder."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

    def refuse(*args, **kwargs):
        raise AssertionError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("NBLORA_DIFFUSION_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single_file")
    return {
        arch: save_ldm_checkpoint(tiny_sd_path(sdxl=arch == "sdxl"), root / f"tiny-{arch}.safetensors")
        for arch in ("sd1", "sdxl")
    }


def folder(arch: str) -> Path:
    return tiny_sd_path(sdxl=arch == "sdxl")


def variant(src: Path, dst: Path, drop: str = "", **add: torch.Tensor) -> Path:
    """A copy of a checkpoint without the keys starting with ``drop`` and with ``add``."""
    tensors = {k: v for k, v in load_file(str(src)).items() if not (drop and k.startswith(drop))}
    save_file({**tensors, **add}, str(dst))
    return dst


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as info:
        load_pipeline(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_single_file_gives_the_same_images_as_its_diffusers_folder(files, arch):
    pipe = load_pipeline(files[arch], config=folder(arch))
    reference = load_pipeline(folder(arch))
    assert type(pipe) is type(reference) and pipe.name_or_path == str(files[arch])
    assert dict(pipe.scheduler.config) == dict(reference.scheduler.config)
    assert torch.equal(images(pipe), images(reference))


def test_dtype_is_applied_to_every_model(files):
    pipe = load_pipeline(files["sdxl"], dtype="fp16", config=folder("sdxl"))
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float16}


def test_ckpt_is_refused_unless_allowed_and_then_read_weights_only(files, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    torch.save(
        {"state_dict": load_file(str(files["sd1"]))}, ckpt
    )  # the Lightning nesting of real .ckpt files
    one_line_error(
        r"tiny.ckpt is a pickled .ckpt checkpoint: refused unless allowed", ckpt, config=folder("sd1")
    )
    pipe = load_pipeline(ckpt, config=folder("sd1"), allow_ckpt=True)
    assert torch.equal(images(pipe), images(load_pipeline(folder("sd1"))))
    # an object that is not a tensor is never unpickled, even when .ckpt files are allowed
    torch.save({"state_dict": {}, "callback": _Opaque()}, tmp_path / "objects.ckpt")
    one_line_error("weights-only loader", tmp_path / "objects.ckpt", allow_ckpt=True)


class _Opaque:
    """Stands for the Lightning callback objects some .ckpt files pickle."""


def test_checkpoint_of_another_size_names_the_skeleton_and_the_mismatch(files):
    message = one_line_error(
        r"cannot load tiny-sd1.safetensors as SD1.x with the configs in sd15: ", files["sd1"]
    )
    assert "expected shape torch.Size([77, 768]), but got torch.Size([77, 32])" in message
    assert "config=" in message
    one_line_error(r"cannot load tiny-sdxl.safetensors as SDXL with the configs in sdxl-base", files["sdxl"])


def test_bad_files_give_one_line_errors(files, tmp_path):
    sd1, sdxl = files["sd1"], files["sdxl"]
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(sd1.read_bytes()[: sd1.stat().st_size // 2])
    one_line_error(r"cannot read .*cut.safetensors: truncated or not a safetensors file", truncated)
    partial = variant(sd1, tmp_path / "partial.safetensors", drop="model.diffusion_model.out.0.weight")
    one_line_error(r"partial.safetensors lacks 1 unet weights \(e.g. 'conv_norm_out.weight'\)", partial,
                   config=folder("sd1"))  # fmt: skip
    no_vae = variant(sd1, tmp_path / "unet_te.safetensors", drop="first_stage_model.")
    one_line_error(r"unet_te.safetensors holds no VAE \(first_stage_model.\* keys\)", no_vae)
    no_text = variant(sd1, tmp_path / "no_text.safetensors", drop="cond_stage_model.")
    one_line_error(r"no_text.safetensors has a UNet but no text encoder weights in a known layout", no_text)
    one_line_error(
        r"tiny-sdxl.safetensors is an SDXL checkpoint, but config folder .*tiny-sd holds a StableDiffusion",
        sdxl,
        config=folder("sd1"),
    )
    one_line_error(r"tiny-sd1.safetensors is an SD1.x checkpoint, not sdxl-base", sd1, config="sdxl-base")
    one_line_error(r"model path not found: .*missing.safetensors", tmp_path / "missing.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"0" * 16)
    one_line_error(r"weights.bin is a file; expected a diffusers pipeline folder", tmp_path / "weights.bin")
    one_line_error(r"config= applies to single-file checkpoints", folder("sd1"), config=folder("sd1"))


@pytest.mark.parametrize(
    ("tensors", "found"),
    [
        ({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4)}, "'flux-schnell'"),
        (
            {"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(4)},
            "'xl_refiner'",
        ),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}, "'inpainting'"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, "no Stable"),
    ],
    ids=["flux", "sdxl-refiner", "inpainting", "lora"],
)
def test_checkpoint_of_another_family_is_named(tmp_path, tensors, found):
    path = tmp_path / "other.safetensors"
    save_file(tensors, str(path))
    message = one_line_error(r"other.safetensors", path)
    assert found in message and ("supported are SD1.x, SD2.x and SDXL base" in message or "LoRA" in message)


def synthetic(tensors: dict[str, torch.Tensor]) -> sf.Checkpoint:
    return sf.Checkpoint(Path("x.safetensors"), tensors, read=lambda keys: {k: tensors[k] for k in keys})


def test_sd2_prediction_type_follows_comfyuis_weight_statistic():
    gen = torch.Generator().manual_seed(0)
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    v = synthetic({probe: 0.2 * torch.randn(1280, generator=gen)})
    eps = synthetic({probe: 0.01 * torch.randn(1280, generator=gen)})
    assert (
        sf.prediction_type(v, "sd2") == "v_prediction" and sf.skeleton_for("sd2", "v_prediction") == "sd21-v"
    )
    assert sf.prediction_type(eps, "sd2") == "epsilon" and sf.skeleton_for("sd2", "epsilon") == "sd21-base"
    assert sf.prediction_type(v, "sd1") == "epsilon"  # the statistic is for SD2.x only
    marked = synthetic({"v_pred": torch.zeros(())})  # the kohya / ComfyUI marker of v-prediction files
    assert sf.prediction_type(marked, "sdxl") == "v_prediction"


def test_the_inferred_prediction_type_sets_the_skeletons_scheduler(files, tmp_path, monkeypatch):
    """The skeleton path end to end, with the tiny folder standing in for the real-size skeleton."""
    requested = []

    def tiny_skeleton(name, cache_dir=None):
        requested.append(name)
        return folder("sdxl")

    monkeypatch.setattr(sf, "skeleton_dir", tiny_skeleton)
    marked = variant(files["sdxl"], tmp_path / "vpred.safetensors", v_pred=torch.zeros(()))
    pipe = load_pipeline(marked)
    assert requested == ["sdxl-base"] and pipe.scheduler.config.prediction_type == "v_prediction"
    assert load_pipeline(files["sdxl"]).scheduler.config.prediction_type == "epsilon"


def test_base_model_id_is_name_and_content_hash(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (4 << 20,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    a = tmp_path / "model.safetensors"
    a.write_bytes(data)
    ident = sf.base_model_id(a)
    assert ident.startswith("model.safetensors@") and len(ident.rpartition("@")[2]) == 16
    renamed = tmp_path / "renamed.safetensors"
    shutil.copyfile(a, renamed)
    assert sf.same_base_model(ident, sf.base_model_id(renamed)) and sf.base_model_id(renamed) != ident
    # same size, same first MiB (header and text encoder of a real file), different later weights
    changed = bytearray(data)
    changed[3 << 20] ^= 0xFF  # inside the 13th of the 16 sampled blocks
    b = tmp_path / "finetune.safetensors"
    b.write_bytes(bytes(changed))
    assert not sf.same_base_model(ident, sf.base_model_id(b))
    assert sf.file_base_model_id(tmp_path) is None and sf.file_base_model_id("owner/model") is None
