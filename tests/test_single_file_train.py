"""train_dreambooth.py on a single-file checkpoint: the adapter records the file (name + content hash),
it and its LoRA exports load back onto that file, and load_adapter refuses another checkpoint."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from nblora_diffusion import diffusion
from nblora_diffusion.diffusion import adapted_components, load_adapter, load_pipeline
from nblora_diffusion.diffusion.single_file import base_model_id
from nblora_diffusion.testing import make_tiny_sd, tiny_sd_path
from nblora_diffusion.testing.ldm_layout import save_ldm_checkpoint

from sd_helpers import PROMPT, images

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "assets" / "dreambooth" / "dog"
TOL = 1e-4  # fp32 max abs pixel difference between the native adapter and its stock-diffusers exports
_spec = importlib.util.spec_from_file_location("train_dreambooth", ROOT / "train_dreambooth.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def run(request, tmp_path_factory):
    """Two training steps on the tiny model saved as an LDM-layout .safetensors file."""
    sdxl = request.param == "sdxl"
    root = tmp_path_factory.mktemp(f"train_{request.param}")
    ckpt = save_ldm_checkpoint(tiny_sd_path(sdxl=sdxl), root / f"tiny-{request.param}.safetensors")
    out = root / "out"
    argv = ["--pretrained_model_name_or_path", str(ckpt), "--instance_data_dir", str(DOG),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", "32",
            "--report_to", "none", "--max_train_steps", "2", "--learning_rate", "5e-2",
            "--norm_bound", "0.5", "--seed", "0", "--export_kohya",
            # the tiny model is not of a real SD size: its configs come from its folder (the shipped
            # real-size skeletons would not fit it)
            "--base_model_config", str(tiny_sd_path(sdxl=sdxl))]  # fmt: skip
    assert cli.main(argv) == 0
    return sdxl, ckpt, out


def on_checkpoint(run):
    sdxl, ckpt, _ = run
    return load_pipeline(ckpt, config=tiny_sd_path(sdxl=sdxl))


def test_adapter_records_the_checkpoint_file_and_its_hash(run):
    _, ckpt, out = run
    info = json.loads((out / diffusion.CONFIG_NAME).read_text())
    assert info["base_model"] == str(ckpt)
    assert info["base_model_id"] == base_model_id(ckpt) and info["base_model_id"].startswith(f"{ckpt.name}@")
    for name in ("pytorch_lora_weights.safetensors", "kohya_lora.safetensors"):
        assert (out / name).is_file(), name


def test_adapter_and_its_exports_load_back_onto_the_checkpoint(run):
    _, _, out = run
    base = images(on_checkpoint(run))
    pipe = on_checkpoint(run)
    load_adapter(pipe, out)
    ours = images(pipe)
    assert (ours - base).abs().max() > 100 * TOL, "the trained adapter does not change the images"
    for lora in (out, out / "kohya_lora.safetensors"):  # diffusers format, then kohya format
        stock = on_checkpoint(run)
        stock.load_lora_weights(str(lora))
        assert (images(stock) - ours).abs().max() <= TOL, lora.name


def test_load_adapter_refuses_another_checkpoint(run, tmp_path):
    sdxl, ckpt, out = run
    other_folder = make_tiny_sd(tmp_path / "seed1", sdxl=sdxl, seed=1)  # same architecture, other weights
    other = save_ldm_checkpoint(other_folder, tmp_path / "other.safetensors")
    pipe = load_pipeline(other, config=other_folder)
    with pytest.raises(
        ValueError, match=rf"trained on checkpoint {ckpt.name}@\w+, the pipeline is other"
    ) as e:
        load_adapter(pipe, out)
    assert "\n" not in str(e.value) and not adapted_components(pipe)
    renamed = shutil.copyfile(ckpt, tmp_path / "renamed.safetensors")  # the same content under another name
    pipe = load_pipeline(renamed, config=tiny_sd_path(sdxl=sdxl))
    load_adapter(pipe, out)
    assert torch.equal(images(pipe), images(_loaded(on_checkpoint(run), out)))


def _loaded(pipe, folder):
    load_adapter(pipe, folder)
    return pipe
