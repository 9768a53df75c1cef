"""`python -m eval benchmark`: 2 subjects × 2 methods × 2 checkpoints on the tiny SD, killed half-way
and resumed, gives the same report as an uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eval.benchmark import shard_units
from eval.cli import main
from eval.dataset import format_prompt, prompt_templates, read_dataset
from eval.methods import read_methods
from nblora_diffusion.testing.metric_models import metric_models_path
from nblora_diffusion.testing.tiny_sd import tiny_sd_path

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT / "assets" / "dreambooth"
METHODS = {
    "train": {"max_train_steps": 4, "checkpointing_steps": 2, "learning_rate": 0.01, "seed": 0,
              "report_to": "none"},
    "methods": [
        {"id": "lora_r4", "name": "LoRA r=4", "adapter": "lora", "rank": 4},
        {"id": "nblora_p2_d1", "name": "NB-LoRA p=2 δ=1", "adapter": "nblora", "rank": 4, "norm_p": "2",
         "norm_bound": 1.0},
    ],
}  # fmt: skip


def _args(methods: Path, out: Path, *extra: str) -> list[str]:
    m = metric_models_path()
    return ["benchmark", "--dataset", str(DATASET), "--base_model", str(tiny_sd_path()),
            "--methods", str(methods), "--out", str(out), "--max_prompts", "2", "--images_per_prompt", "2",
            "--num_inference_steps", "2", "--dino_model", str(m.dino), "--clip_model", str(m.clip),
            "--lpips_model", str(m.lpips), "--lpips_size", "64", "--no_save_images", *extra]  # fmt: skip


@pytest.fixture()
def methods(tmp_path):
    path = tmp_path / "methods.json"
    path.write_text(json.dumps(METHODS))
    return path


def _report(out: Path) -> tuple[str, str, str]:
    r = out / "report"
    return (r / "results.json").read_text(), (r / "table.md").read_text(), (r / "table.csv").read_text()


def test_benchmark_killed_halfway_and_resumed_gives_the_same_report(methods, tmp_path):
    full = tmp_path / "full"
    assert main(_args(methods, full)) == 0
    results = json.loads((full / "report" / "results.json").read_text())
    assert results["subjects"] == ["backpack", "dog"]
    for method in results["methods"]:
        assert sorted(method["steps"]) == ["2", "4"]
        assert method["steps"]["4"]["dino"]["pairs"] == (6 + 5) * 4  # photos × generated, both subjects
    assert [r["row"] for r in results["table"]] == ["best DINO", "step 4"] * 2 + ["i ≠ j"]
    for name in ("tradeoff_dino_clip_t.png", "curves/dino.png", "curves/lpips_ref.png"):
        assert (full / "report" / name).stat().st_size > 1000

    # second run in a subprocess, killed (SIGKILL) once the 2nd unit has written its first checkpoint
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "eval", *_args(methods, killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    mark = killed / "runs" / "nblora_p2_d1" / "backpack" / "checkpoint-2"
    deadline = time.monotonic() + 300
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    assert proc.returncode == -9, err[-2000:]
    finished = [str(p.parent.relative_to(killed / "scores")) for p in killed.glob("scores/*/*/report.json")]
    assert "lora_r4/backpack" in finished and len(finished) < 4  # killed half-way (normally in unit 2)
    assert not (killed / "report").exists()

    assert main(_args(methods, killed)) == 0  # continues: unit 2 resumes from its checkpoint
    assert _report(killed) == _report(full)


def test_dataset_layout_gives_classes_and_prompt_lists():
    data = read_dataset(DATASET)
    assert sorted(data.subjects) == ["backpack", "dog"]  # subjects listed in the file and present on disk
    dog, bag = data.subjects["dog"], data.subjects["backpack"]
    assert (dog.class_noun, dog.live, bag.class_noun, bag.live) == ("dog", True, "backpack", False)
    assert len(data.templates(dog)) == len(data.templates(bag)) == 25
    assert format_prompt(data.templates(dog)[10], "sks", "dog") == "a sks dog wearing a red hat"
    assert format_prompt(data.templates(bag)[0], "sks", "backpack") == "a sks backpack in the jungle"
    assert prompt_templates("dreambooth-auto", "cat")[10] == "a {0} {1} wearing a red hat"
    assert [s.name for s in data.select("dog")] == ["dog"]


def test_prompt_file_with_named_placeholders(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\na {token} {class_noun} on the moon\n\na photo of {0} {1}\n")
    got = [format_prompt(t, "zwx", "cat") for t in prompt_templates(str(f), "cat")]
    assert got == ["a zwx cat on the moon", "a photo of zwx cat"]


def test_table3_preset_has_the_seed_grid():
    _, methods = read_methods("table3")
    grid = [(m.options["adapter"], m.options.get("norm_p"), m.options.get("norm_bound")) for m in methods]
    assert grid == [("lora", None, None), *[("nblora", "1", d) for d in (12, 6, 4)],
                    *[("nblora", "2", d) for d in (1.8, 1.5, 1.0)],
                    *[("nblora", "inf", d) for d in (0.9, 0.5, 0.25)]]  # fmt: skip
    assert methods[0].options["rank"] == 16


def test_units_train_with_seed_0_unless_their_method_sets_one(tmp_path):
    import argparse

    from eval.benchmark import train_options
    from eval.score import GenerationConfig

    spec_file = tmp_path / "methods.json"
    methods = [
        {"id": "a", "name": "A", "adapter": "lora"},
        {"id": "b", "name": "B", "adapter": "lora", "seed": 7},
    ]
    spec_file.write_text(json.dumps({"train": {"max_train_steps": 4}, "methods": methods}))
    seeded = tmp_path / "seeds.json"
    seeded.write_text(json.dumps({"seeds": [1, 2], "methods": [{"id": "a", "name": "A", "adapter": "lora"}]}))
    spec = argparse.Namespace(gen=GenerationConfig(), base_model="M", run_dir=lambda s, m: tmp_path / m.id,
                              out=tmp_path, token="sks")  # fmt: skip
    subject = argparse.Namespace(folder=tmp_path, class_noun="dog")
    seeds = [
        train_options(spec, subject, m)["seed"] for f in (spec_file, seeded) for m in read_methods(str(f))[1]
    ]
    assert seeds == [0, 7, 1, 2]  # a re-run of a file without seeds trains the same adapters


def test_shards_partition_the_units():
    units = list(range(7))
    shards = [shard_units(units, i, 3) for i in range(3)]
    assert sorted(u for s in shards for u in s) == units


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ")
    return err


def test_bad_benchmark_input_is_a_one_line_error(methods, tmp_path, capsys):
    out = tmp_path / "out"
    assert "subject(s) cat not in" in _error(capsys, _args(methods, out, "--subjects", "dog,cat"))
    assert "--shard must be i/n" in _error(capsys, _args(methods, out, "--shard", "2/2"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"methods": [{"name": "x", "adapter": "lora", "output_dir": "/tmp/x"}]}))
    assert "set by the benchmark runner" in _error(capsys, _args(bad, out))
    bad.write_text(json.dumps({"methods": [{"name": "x", "adapter": "nblora", "norm_p": "0.5"}]}))
    assert "--norm_p" in _error(capsys, _args(bad, out))
    data = tmp_path / "data"
    shutil.copytree(DATASET, data)
    for photo in (data / "dog").iterdir():
        photo.unlink()
    args = _args(methods, out)
    args[args.index("--dataset") + 1] = str(data)
    assert "no images" in _error(capsys, args)
    assert not out.exists()
    out.mkdir()
    (out / "benchmark.json").write_text(json.dumps({"base_model": "another"}))
    assert "other settings" in _error(capsys, _args(methods, out))


def test_subprocess_training_arguments_parse_back_to_the_same_config(tmp_path):
    from eval.benchmark import _cli_args
    from nblora_diffusion.training import TrainConfig, build_parser

    _, methods = read_methods("table3")
    opts = {**methods[4].options, "instance_data_dir": str(DATASET / "dog"),
            "instance_prompt": "a photo of sks dog", "output_dir": str(tmp_path), "train_text_encoder": True,
            "resume_from_checkpoint": "latest"}  # fmt: skip
    parsed = TrainConfig(**vars(build_parser().parse_args(_cli_args(opts))))
    assert parsed == TrainConfig(**opts)
