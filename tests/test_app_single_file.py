"""The app on a single-file base model: --base_model_config reaches the pipeline loading (as it does for
train_dreambooth.py and python -m eval), and the training settings carry it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from nblora_diffusion.app_logic import AppHandlers
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.testing.ldm_layout import save_ldm_checkpoint

from app_harness import app_module, tiny_train_config


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NBLORA_DIFFUSION_CACHE", str(tmp_path / "cache"))  # the skeletons' tokenizer files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny SD1 as an LDM-layout file whose name tells nothing."""
    return save_ldm_checkpoint(tiny_sd_path(), tmp_path_factory.mktemp("file") / "model.safetensors")


def test_app_command_line_takes_base_model_config_for_a_single_file(checkpoint):
    app = app_module()
    args = app.parse_args(["--base_model", str(checkpoint), "--base_model_config", str(tiny_sd_path())])
    assert args.base_model_config == str(tiny_sd_path())
    with pytest.raises(SystemExit):  # a folder has its own configs
        app.parse_args(["--base_model", str(tiny_sd_path()), "--base_model_config", str(tiny_sd_path())])


def test_app_opens_a_single_file_checkpoint_with_its_base_model_config(checkpoint, tmp_path):
    """The tiny model is not of a real SD size, so only its own configs (--base_model_config) fit it."""
    h = AppHandlers(str(checkpoint), tmp_path, device="cpu", base_model_config=tiny_sd_path())
    pipe = h.cache.base(str(checkpoint))
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_path())
    assert pipe.name_or_path == str(checkpoint)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want), name


def test_app_training_settings_carry_the_base_model_config(checkpoint, tmp_path):
    config = tiny_train_config(tmp_path, base_model=str(checkpoint), base_model_config=str(tiny_sd_path()))
    assert config.base_model_config == str(tiny_sd_path())
    assert config.pretrained_model_name_or_path == str(checkpoint)
