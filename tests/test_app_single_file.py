"""The app on a single-file base model: --base_model_config reaches the pipeline loading (as it does for
train_dreambooth.py and python -m eval), and the training settings carry it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline

from nblora_diffusion.app_logic import AppHandlers
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.testing.ldm_layout import save_ldm_checkpoint

from app_harness import app_module


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
    from nblora_diffusion.app_logic.train_settings import make_train_config

    config = make_train_config(
        base_model=str(checkpoint),
        base_model_config=str(tiny_sd_path()),
        instance_data_dir=tmp_path / "photos",
        output_dir=tmp_path / "out",
        token="sks",
        class_noun="dog",
        p=2,
        delta=1.0,
        rank=2,
        max_train_steps=1,
        learning_rate=1e-3,
        seed=0,
        resolution=32,
    )
    assert config.base_model_config == str(tiny_sd_path())
    assert config.pretrained_model_name_or_path == str(checkpoint)


def test_a_training_run_leaves_the_global_tf32_flag_as_it_was(tmp_path):
    """--allow_tf32 makes train() set torch's process-wide TF32 flag; the app restores it after the run."""
    from nblora_diffusion.app_logic.training_job import TrainingSlot

    def train_with_tf32(config, callbacks=None, should_stop=None):
        torch.backends.cuda.matmul.allow_tf32 = True  # what training.loop.train does for --allow_tf32
        return None

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        run = TrainingSlot(train_with_tf32).start(SimpleNamespace(output_dir=str(tmp_path / "run")))
        run.wait(timeout=60)
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
