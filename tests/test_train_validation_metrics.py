"""--validation_metrics: the suite's metrics of each validation's images vs the instance photos, in
validation_metrics.csv, and best_checkpoint.json naming the best step under a constraint."""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from nblora_diffusion.metrics import list_images
from nblora_diffusion.metrics.extractors import DinoFeatures
from nblora_diffusion.testing.metric_models import metric_models_path
from nblora_diffusion.testing.tiny_sd import tiny_sd_path
from nblora_diffusion.training import TrainConfig, train
from nblora_diffusion.training.validation_metrics import Constraint, token_and_noun

DOG = Path(__file__).resolve().parents[1] / "assets" / "dreambooth" / "dog"


def test_constraint_reads_base_offsets_and_numbers():
    c = Constraint.parse("clip_t>=base-0.01")
    assert (c.metric, c.op, c.base, c.value) == ("clip_t", ">=", True, pytest.approx(-0.01))
    assert c.holds({"clip_t": 0.295}, {"clip_t": 0.30}) and not c.holds({"clip_t": 0.289}, {"clip_t": 0.30})
    assert Constraint.parse("drift<0.2").holds({"drift": 0.1}, {})
    with pytest.raises(ValueError, match="must read like"):
        Constraint.parse("clip_t >> 3")
    assert token_and_noun("a photo of sks dog", "a photo of dog") == ("sks", "dog")


def test_bad_metric_options_are_one_line_errors():
    kw = dict(instance_data_dir=".", instance_prompt="a photo of sks dog")
    with pytest.raises(ValueError, match="needs --validation_prompt"):
        TrainConfig(**kw, validation_metrics="dino")
    with pytest.raises(ValueError, match="subset of"):
        TrainConfig(**kw, validation_prompt="x", validation_metrics="fid")
    with pytest.raises(ValueError, match="--best_metric clip_t must be one of"):
        TrainConfig(**kw, validation_prompt="x", validation_metrics="dino", best_metric="clip_t")


def test_metrics_logged_each_validation_and_best_step_meets_constraint(tmp_path, one_thread):
    m = metric_models_path()
    settings = tmp_path / "metrics.json"
    settings.write_text(
        json.dumps(
            {
                "dino_model": str(m.dino),
                "clip_model": str(m.clip),
                "clip_pretrained": None,
                "lpips_model": str(m.lpips),
                "lpips_size": 64,
            }
        )
    )
    out = tmp_path / "run"
    cfg = TrainConfig(pretrained_model_name_or_path=str(tiny_sd_path()), instance_data_dir=str(DOG),
                      instance_prompt="a photo of sks dog", class_prompt="a photo of dog",
                      output_dir=str(out), max_train_steps=4, checkpointing_steps=2, validation_steps=2,
                      validation_prompt="a photo of sks dog on the beach", num_validation_images=2,
                      validation_inference_steps=2, learning_rate=1e-2, seed=0, report_to="none", rank=4,
                      norm_bound=1.0, validation_metrics="dino,clip_t,drift",
                      validation_metric_config=str(settings), validation_metrics_offload=True,
                      best_metric="dino", best_constraint="clip_t>=base-1")  # fmt: skip
    train(cfg)
    with open(out / "validation_metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # the base model's row, then each validation
    assert float(rows[0]["drift"]) == pytest.approx(0.0, abs=1e-9)  # base vs itself
    # DINO at step 4 by hand: the grid's tiles vs the photos, every pair
    dino = DinoFeatures(str(m.dino), torch.device("cpu"))
    grid = Image.open(out / "validation" / "step-000004.png").convert("RGB")
    side = grid.height
    tiles = [grid.crop((i * side, 0, (i + 1) * side, side)) for i in range(2)]
    G, R = dino.features(tiles), dino.features([Image.open(p).convert("RGB") for p in list_images(DOG)])
    sims = (
        torch.nn.functional.normalize(G.double(), dim=1) @ torch.nn.functional.normalize(R.double(), dim=1).T
    )
    assert float(rows[2]["dino"]) == pytest.approx(float(sims.mean()), rel=1e-4)
    best = json.loads((out / "best_checkpoint.json").read_text())
    steps = {int(r["step"]): float(r["dino"]) for r in rows[1:]}
    assert best["step"] == max(steps, key=lambda s: (steps[s], -s)) and best["metric"] == "dino"
    assert best["checkpoint"] == str(out / f"checkpoint-{best['step']}")
    assert best["steps_meeting_constraint"] == [2, 4]
