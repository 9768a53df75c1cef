"""`python -m eval score` end to end: tiny SD, adapters trained by the real trainer, random-weight
metric models saved in their real formats."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval.score
from eval.cli import main
from nblora_diffusion.testing.metric_models import metric_models_path
from nblora_diffusion.testing.tiny_sd import tiny_sd_path
from nblora_diffusion.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "assets" / "dreambooth" / "dog"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An NB-LoRA run and a LoRA run, 4 steps each, checkpoints at steps 2 and 4."""
    base, root = tiny_sd_path(), tmp_path_factory.mktemp("runs")
    for adapter in ("nblora", "lora"):
        cfg = TrainConfig(pretrained_model_name_or_path=str(base), instance_data_dir=str(DOG),
                          instance_prompt="a photo of sks dog", class_prompt="a photo of dog",
                          output_dir=str(root / adapter), max_train_steps=4, checkpointing_steps=2,
                          learning_rate=1e-2, seed=0, report_to="none", adapter=adapter, rank=4,
                          norm_bound=1.0 if adapter == "nblora" else None)  # fmt: skip
        train(cfg)
    return base, root


def _args(base, adapters, out, *extra):
    m = metric_models_path()
    return ["score", "--base_model", str(base), "--adapters", *map(str, adapters), "--instance_dir", str(DOG),
            "--prompts", "dreambooth-live", "--max_prompts", "2", "--images_per_prompt", "2",
            "--num_inference_steps", "2", "--out", str(out), "--dino_model", str(m.dino),
            "--clip_model", str(m.clip), "--lpips_model", str(m.lpips), "--lpips_size", "64",
            *extra]  # fmt: skip


def _numbers(out):
    report = json.loads((Path(out) / "report.json").read_text())
    return {(r["run"], r["name"]): r["metrics"] for r in report["checkpoints"]}, report["real"]


@pytest.fixture(scope="module")
def scored(runs, tmp_path_factory):
    """Both runs scored once into one report folder (shared by the tests below, which only read it)."""
    base, root = runs
    out = tmp_path_factory.mktemp("scored") / "r"
    args = _args(base, [root / "nblora", root / "lora"], out)
    assert main(args) == 0
    return args, out


def test_score_writes_json_csv_markdown_and_plots_for_every_checkpoint(scored):
    _, out = scored
    report = json.loads((out / "report.json").read_text())
    got = [(r["run"], r["name"], r["step"], r["kind"]) for r in report["checkpoints"]]
    assert got == [("nblora", "checkpoint-2", 2, "nblora"), ("nblora", "checkpoint-4", 4, "nblora"),
                   ("lora", "checkpoint-2", 2, "lora"), ("lora", "checkpoint-4", 4, "lora")]  # fmt: skip
    assert report["class_noun"] == "dog" and report["token"] == "sks"  # read from prompts_and_classes.txt
    assert report["settings"]["prompts"][0] == "a sks dog in the jungle"
    assert report["settings"]["clip_t_texts"][0] == "a dog in the jungle"
    n_real, n_gen = 5, 2 * 2
    for row in report["checkpoints"]:
        m = row["metrics"]
        assert m["dino"]["pairs"] == m["clip_i"]["pairs"] == m["lpips_ref"]["pairs"] == n_real * n_gen
        assert m["clip_t"]["pairs"] == n_gen and m["lpips_div"]["pairs"] == 2  # one pair per prompt
        assert -1 <= m["dino"]["mean"] <= 1 and m["lpips_ref"]["mean"] >= 0
    assert report["real"]["dino"]["pairs"] == n_real * (n_real - 1)
    # the adapters change the images: checkpoints of a run score differently
    assert report["checkpoints"][0]["metrics"] != report["checkpoints"][1]["metrics"]
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["nblora", "nblora", "lora", "lora", "real images"]
    assert "| DINO |" in (out / "report.md").read_text()
    for metric in ("dino", "clip_i", "clip_t", "lpips_div", "lpips_ref"):
        with Image.open(out / "plots" / f"{metric}.png") as im:
            assert im.width > 100
    assert len(list((out / "images" / "lora" / "checkpoint-4").glob("*.png"))) == n_gen


def test_identical_seeds_give_identical_numbers(scored, tmp_path):
    """A fresh pipeline and fresh metric models (the benchmark test also compares across processes)."""
    args, out = scored
    again = list(args)
    again[again.index("--out") + 1] = str(tmp_path / "again")
    assert main(again) == 0
    assert _numbers(tmp_path / "again") == _numbers(out)


def test_rescoring_reuses_scored_checkpoints_and_redoes_changed_settings(scored, tmp_path, monkeypatch):
    args, out = scored
    copy = shutil.copytree(out, tmp_path / "r")
    args = [str(copy) if a == str(out) else a for a in args]
    calls = []
    real_generate = eval.score.generate
    monkeypatch.setattr(eval.score, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    assert main(args) == 0
    assert calls == [] and _numbers(copy) == _numbers(out)
    assert main([*args, "--seed", "1"]) == 0
    assert len(calls) == 4  # every checkpoint scored again, with other noise
    seeded, real = _numbers(copy)
    assert real == _numbers(out)[1]  # the real-images row has no seed
    assert all(seeded[k] != v for k, v in _numbers(out)[0].items())


def _error(capsys, argv):
    capsys.readouterr()  # drop what came before (the module fixture's training writes progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_a_one_line_error(runs, tmp_path, capsys, monkeypatch):
    base, root = runs
    args = _args(base, [root / "nblora"], tmp_path / "r")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device: no CUDA device is available" in _error(capsys, args + ["--device", "cuda"])
    assert "--metric_device: unknown device 'gpu'" in _error(capsys, args + ["--metric_device", "gpu"])
    at = args.index("--instance_dir") + 1

    assert "image folder not found" in _error(capsys, args[:at] + [str(tmp_path / "nope")] + args[at + 1 :])
    (tmp_path / "empty").mkdir()
    assert "no images" in _error(capsys, args[:at] + [str(tmp_path / "empty")] + args[at + 1 :])
    shutil.copytree(DOG, tmp_path / "photos")
    assert "--class_noun is required" in _error(
        capsys, args[:at] + [str(tmp_path / "photos")] + args[at + 1 :]
    )

    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    b = args.index("--base_model") + 1
    assert "was trained on base model" in _error(capsys, args[:b] + [str(other)] + args[b + 1 :])

    d = args.index("--dino_model") + 1
    assert "DINO model 'nblora-test/absent-dino'" in _error(
        capsys, args[:d] + ["nblora-test/absent-dino"] + args[d + 1 :]
    )
    assert "no adapter in" in _error(capsys, _args(base, [tmp_path / "empty"], tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing written for bad input


def test_discover_lists_checkpoints_then_a_final_adapter_of_another_step(runs, tmp_path):
    from eval.checkpoints import discover

    _, root = runs
    for kind in ("nblora", "lora"):
        run = shutil.copytree(root / kind, tmp_path / kind)
        assert [(r.name, r.step) for r in discover(run)] == [("checkpoint-2", 2), ("checkpoint-4", 4)]
        shutil.rmtree(run / "checkpoint-4")  # the final adapter (step 4) is no longer a checkpoint
        refs = discover(run)
        assert [(r.name, r.step, r.kind) for r in refs] == [("checkpoint-2", 2, kind), ("final", 4, kind)]
        assert [(r.name, r.step) for r in discover(run / "checkpoint-2")] == [("checkpoint-2", 2)]
        assert refs[0].base_model == str(tiny_sd_path())
