"""train_dreambooth.py: options <-> TrainConfig, one-line errors for bad input, nothing half-written, demo."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.training import TrainConfig, build_parser, train

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "assets" / "dreambooth" / "dog"
_spec = importlib.util.spec_from_file_location("train_dreambooth", ROOT / "train_dreambooth.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def args(out: Path, *extra: str, model: str | None = None) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        model or str(tiny_sd_path()),
        "--instance_data_dir",
        str(DOG),
        "--instance_prompt",
        "a photo of sks dog",
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--report_to",
        "none",
        *extra,
    ]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_option_is_a_config_field_with_the_same_default():
    parser = build_parser()
    options = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert options == fields
    for name in (
        "pretrained_model_name_or_path",
        "instance_data_dir",
        "resolution",
        "center_crop",
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "seed",
        "mixed_precision",
        "gradient_checkpointing",
        "use_8bit_adam",
        "train_text_encoder",
        "with_prior_preservation",
        "class_data_dir",
        "class_prompt",
        "num_class_images",
        "prior_loss_weight",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "validation_prompt",
        "validation_steps",
        "num_validation_images",
        "snr_gamma",
        "report_to",
        "adapter",
        "rank",
        "norm_p",
        "norm_bound",
        "norm_bound_ratio",
        "parameterization",
        "text_encoder_rank",
        "text_encoder_norm_bound",
        "bernoulli_p",
        "export_kohya",
        "overwrite_output_dir",
    ):
        assert name in fields, name
    parsed, builtin = cli.parse(
        [
            "--norm_p",
            "1.5",
            "--rank",
            "8",
            "--with_prior_preservation",
            "--class_data_dir",
            "c",
            "--class_prompt",
            "a dog",
            "--instance_data_dir",
            "x",
            "--instance_prompt",
            "p",
        ]
    )
    assert parsed.p == 1.5 and parsed.rank == 8 and parsed.with_prior_preservation and not builtin


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"with_prior_preservation": True, "class_data_dir": "c"}, "needs --class_prompt"),
        ({"with_prior_preservation": True, "class_prompt": "a dog"}, "needs --class_data_dir"),
        ({"norm_bound": 0.1, "norm_bound_ratio": 0.1}, "at most one of --norm_bound and --norm_bound_ratio"),
        ({"norm_p": "0.5"}, "--norm_p"),
        ({"norm_p": "two"}, "--norm_p"),
        ({"resolution": 0}, "--resolution must be an integer >= 1"),
        ({"bernoulli_p": 1.0}, "--bernoulli_p"),
        ({"learning_rate": float("nan")}, "--learning_rate"),
        ({"rank": 0}, "--rank"),
        ({"adapter": "ia3"}, "--adapter must be one of"),
        ({"text_encoder_rank": 2}, "needs --train_text_encoder"),
        ({"adapter": "lora", "parameterization": "I"}, "--parameterization"),
        ({"instance_prompt": "  "}, "must not be empty"),
    ],
)
def test_inconsistent_options_are_one_line_value_errors(changes, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainConfig(**changes)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    "extra, model, message",
    [
        ((), "/nonexistent/model", "model path not found"),
        (("--instance_data_dir", "/nonexistent/photos"), None, "instance data folder not found"),
        (("--mixed_precision", "fp16"), None, "fp16 needs a CUDA GPU"),
        (("--resume_from_checkpoint", "checkpoint-99"), None, "no checkpoint folder"),
        (("--with_prior_preservation", "--class_data_dir", "c"), None, "needs --class_prompt"),
        (("--adapter", "nope"), None, "invalid choice"),
        (("--rank", "1000"), None, "rank must be"),
    ],
)
def test_bad_input_exits_nonzero_with_one_error_line_and_writes_nothing(
    tmp_path, capsys, extra, model, message
):
    out = tmp_path / "out"
    code, _, err = run_cli(args(out, *extra, model=model), capsys)
    assert code != 0
    assert message in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(("error:", "train_dreambooth.py: error:"))
    assert not out.exists(), "nothing may be written for bad input"


def test_missing_bitsandbytes_is_a_clear_error(tmp_path, capsys):
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    code, _, err = run_cli(args(tmp_path / "out", "--use_8bit_adam"), capsys)
    assert code != 0 and "pip install bitsandbytes" in err


def test_folder_of_corrupt_images_is_refused_before_writing(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, _, err = run_cli(args(tmp_path / "out", "--instance_data_dir", str(photos)), capsys)
    assert code != 0 and "no valid instance images" in err and "broken.jpg" in err
    assert not (tmp_path / "out").exists()


def test_output_dir_of_another_run_is_refused_unless_resuming_or_overwriting(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_config.json").write_text("{}")
    (out / "keep.txt").write_text("user file")
    code, _, err = run_cli(args(out), capsys)
    assert code != 0 and "already holds a training run" in err and "--overwrite_output_dir" in err
    config = TrainConfig(**{k: v for k, v in vars(build_parser().parse_args(args(out))).items()})
    with pytest.raises(ValueError, match="contradict"):
        train(config.replace(overwrite_output_dir=True, resume_from_checkpoint="latest"))
    result = train(config.replace(overwrite_output_dir=True, max_train_steps=1, checkpointing_steps=1))
    assert result.final_step == 1 and (out / "keep.txt").read_text() == "user file"
    assert (
        TrainConfig.from_dict(
            __import__("json").loads((out / "train_config.json").read_text())
        ).max_train_steps
        == 1
    )


def test_demo_trains_the_micro_sd_on_the_bundled_subject_and_prints_where_outputs_are(
    tmp_path, capsys, monkeypatch
):
    from nblora_diffusion.microworld import model_path

    try:
        micro = model_path()
    except ValueError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(sys, "argv", ["train_dreambooth.py"])
    config, builtin = cli.parse(["--demo", "--output_dir", str(tmp_path / "x")])
    assert builtin and not config.with_prior_preservation and config.class_prompt == "a photo of a circle"
    assert Path(config.instance_data_dir) == cli.DEMO_SUBJECT and "sks circle" in config.instance_prompt
    assert Path(config.pretrained_model_name_or_path) == micro and config.resolution == 32
    out = tmp_path / "demo_out"
    argv = [
        "--demo",
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "--max_train_steps",
        "2",
        "--validation_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--resolution",
        "32",
        "--report_to",
        "none",
        "--num_class_images",
        "2",
        "--class_inference_steps",
        "2",
    ]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert f"outputs in {out.resolve()}" in stdout
    for name in (
        "nblora_config.json",
        "pytorch_lora_weights.safetensors",
        "norm_curves.png",
        "validation",
        "checkpoint-2",
        "slider_grid.png",
    ):
        assert str(out / name) in stdout and (out / name).exists(), name
    assert "the judge reads the subject" in stdout


def test_resuming_a_checkpoint_of_another_adapter_is_refused(tmp_path):
    from nblora_diffusion.training.checkpoint import write_state

    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)
    write_state(out / "checkpoint-1", {}, {"global_step": 1, "data_seed": 0, "adapter": "lora"})
    config = TrainConfig(**vars(build_parser().parse_args(args(out, "--resume_from_checkpoint", "latest"))))
    with pytest.raises(ValueError, match="trained with --adapter lora, not nblora"):
        train(config)
