"""Single-file base models on the command lines: --base_model_config and --allow_ckpt for train_dreambooth.py
and python -m eval, help texts that name the file form, and the app's native resolution of a file."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nblora_diffusion import diffusion
from nblora_diffusion.app_logic.train_settings import native_resolution
from nblora_diffusion.diffusion import single_file as sf
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.testing.ldm_layout import save_ldm_checkpoint
from nblora_diffusion.training import TrainConfig, build_parser

from app_harness import app_module

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "assets" / "dreambooth" / "dog"
_spec = importlib.util.spec_from_file_location("train_dreambooth", ROOT / "train_dreambooth.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)
FILE_FORM = "hub id, local diffusers folder or single .safetensors file"


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NBLORA_DIFFUSION_CACHE", str(tmp_path / "cache"))  # the skeletons' tokenizer files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD1 and SDXL models as LDM-layout files, named so that the name tells nothing."""
    root = tmp_path_factory.mktemp("files")
    files = {
        arch: save_ldm_checkpoint(tiny_sd_path(sdxl=arch == "sdxl"), root / f"model-{i}.safetensors")
        for i, arch in enumerate(("sd1", "sdxl"))
    }
    ckpt = root / "model.ckpt"
    torch.save({"state_dict": load_file(str(files["sd1"]))}, ckpt)
    return {**files, "ckpt": ckpt}


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(DOG),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "32",
            "--report_to", "none", "--max_train_steps", "1", "--seed", "0", *extra]  # fmt: skip


def test_train_cli_reads_a_single_file_with_its_base_model_config(files, tmp_path, capsys):
    """The tiny model is not of a real SD size: --base_model_config gives its configs (a diffusers folder)."""
    out = tmp_path / "out"
    assert cli.main(train_args(files["sd1"], out, "--base_model_config", str(tiny_sd_path()))) == 0
    info = json.loads((out / diffusion.CONFIG_NAME).read_text())
    assert info["base_model_id"] == sf.base_model_id(files["sd1"])
    # without it the shipped real-size skeleton is used, and the file does not fit it: one line naming it
    code = cli.main(train_args(files["sd1"], tmp_path / "other"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and "sd15" in err[-1] and "config=" in err[-1] and not (tmp_path / "other").exists()


def test_train_cli_reads_a_ckpt_only_with_allow_ckpt(files, tmp_path, capsys):
    config = ("--base_model_config", str(tiny_sd_path()))
    assert cli.main(train_args(files["ckpt"], tmp_path / "refused", *config)) != 0
    assert "refused unless allowed" in capsys.readouterr().err
    assert cli.main(train_args(files["ckpt"], tmp_path / "out", *config, "--allow_ckpt")) == 0


def test_base_model_config_applies_to_single_files_only(tmp_path):
    with pytest.raises(ValueError, match="--base_model_config applies to a single-file"):
        TrainConfig(pretrained_model_name_or_path=str(tiny_sd_path()), base_model_config="sd15")
    TrainConfig(pretrained_model_name_or_path="x.safetensors", base_model_config="sd15")
    TrainConfig(base_model_config="sdxl-base", estimate_memory=True)  # the estimate's model of a hub id


def test_load_base_passes_the_options_to_load_pipeline(monkeypatch):
    from nblora_diffusion.training import setup

    seen = {}

    def fake_load(name, dtype, device, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(diffusion, "load_pipeline", fake_load)
    cfg = TrainConfig(pretrained_model_name_or_path="m.ckpt", base_model_config="sd15", allow_ckpt=True)
    with pytest.raises(ValueError, match="stop here"):
        setup.load_base(cfg, argparse.Namespace(device=torch.device("cpu")))
    assert seen == {"config": "sd15", "allow_ckpt": True}


def test_eval_reads_a_single_file_with_its_base_model_config(files, monkeypatch):
    from eval.benchmark import train_options
    from eval.cli import build_parser as eval_parser
    from eval.cli import generation_config
    from eval.score import GenerationConfig, Scorer

    a = eval_parser().parse_args(["score", "--base_model", str(files["ckpt"]), "--adapters", "x",
                                  "--instance_dir", "y", "--out", "z", "--base_model_config",
                                  str(tiny_sd_path()), "--allow_ckpt"])  # fmt: skip
    gen = generation_config(a)
    assert (gen.base_model_config, gen.allow_ckpt) == (str(tiny_sd_path()), True)
    pipe = Scorer(str(files["ckpt"]), gen=gen).pipe
    assert pipe.name_or_path == str(files["ckpt"]) and not diffusion.is_sdxl(pipe)
    # the default leaves the fingerprint of earlier reports unchanged; a config is part of it
    assert "base_model_config" not in GenerationConfig().describe() and "allow_ckpt" not in gen.describe()
    assert gen.describe()["base_model_config"] == str(tiny_sd_path())
    # the benchmark trains on the same file with the same options
    spec = argparse.Namespace(gen=gen, base_model=str(files["ckpt"]), run_dir=lambda s, m: Path("run"),
                              out=Path("bench"), token="sks")  # fmt: skip
    subject = argparse.Namespace(folder=DOG, class_noun="dog")
    opts = train_options(spec, subject, argparse.Namespace(options={}))
    assert opts["base_model_config"] == str(tiny_sd_path()) and opts["allow_ckpt"] is True
    TrainConfig(**{k: v for k, v in opts.items() if k != "class_prompt"})  # valid training options


def test_help_texts_name_the_single_file_form(capsys):
    from eval.cli import build_parser as eval_parser

    assert FILE_FORM in " ".join(build_parser().format_help().split())
    eval_help = eval_parser()._subparsers._group_actions[0].choices
    for command in ("score", "benchmark"):
        text = " ".join(eval_help[command].format_help().split())
        assert FILE_FORM in text, command
        assert "--base_model_config" in text and "--allow_ckpt" in text
    with pytest.raises(SystemExit):
        app_module().parse_args(["--help"])
    assert FILE_FORM in " ".join(capsys.readouterr().out.split())


def test_native_resolution_of_a_file_comes_from_its_architecture(files, monkeypatch):
    assert native_resolution(str(files["sd1"])) == 512
    assert native_resolution(str(files["sdxl"])) == 1024  # named model-1.safetensors: not from the name
    monkeypatch.setattr(sf, "checkpoint_architecture", lambda ckpt: "sd2")
    monkeypatch.setattr(sf, "prediction_type", lambda ckpt, arch: "v_prediction")
    assert native_resolution(str(files["sd1"])) == 768  # SD2.1 768-v
    monkeypatch.setattr(sf, "prediction_type", lambda ckpt, arch: "epsilon")
    assert native_resolution(str(files["sd1"])) == 512
    assert native_resolution(str(files["ckpt"])) == 512  # a pickle is not opened: a guess from the name
