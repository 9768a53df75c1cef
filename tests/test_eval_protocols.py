"""Protocol presets end to end (`python -m eval score --protocol NAME` on the tiny SD and random-weight
metric models), checked against features computed here and paired/aggregated by hand; drift, the
slider sweep, and HRA's best-step-per-prompt rule."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.cli import main
from nblora_diffusion.metrics import drift_from_features, list_images, select_best_per_prompt
from nblora_diffusion.metrics.extractors import ClipFeatures, DinoFeatures, LpipsFeatures
from nblora_diffusion.metrics.scoring import matched_rows
from nblora_diffusion.testing.metric_models import make_dinov2, make_lpips, metric_models_path
from nblora_diffusion.testing.tiny_sd import tiny_sd_path
from nblora_diffusion.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "assets" / "dreambooth" / "dog"
CPU = torch.device("cpu")
TOL = 1e-5  # float32 features, float64 sums


def test_best_per_prompt_follows_hra_normalised_sum():
    # unit 0: DINO / 0.2 -> 2.5, 3.5, 3.0; CLIP-T / 0.1 -> 3.0, 2.0, 2.9; sums 5.5, 5.5, 5.9 -> step 6
    # unit 1: CLIP-T constant (adds nothing); DINO / 0.5 -> 0.2, 1.2, 0.4 -> step 4
    d, t, drift = "dino", "clip_t", "drift"
    units = [
        {
            2: {d: 0.5, t: 0.30, drift: 0.1},
            4: {d: 0.7, t: 0.20, drift: 0.1},
            6: {d: 0.6, t: 0.29, drift: 0.2},
        },
        {
            2: {d: 0.1, t: 0.25, drift: 0.1},
            4: {d: 0.6, t: 0.25, drift: 0.3},
            6: {d: 0.2, t: 0.25, drift: 0.1},
        },
    ]
    steps, means = select_best_per_prompt(units, [d, t])  # drift is reported, not selected on
    assert steps == [6, 4]
    assert means == pytest.approx({d: 0.6, t: 0.27, drift: 0.25})


def test_tie_keeps_the_earlier_step_and_constant_metrics_add_nothing():
    units = [{2: {"dino": 0.5, "clip_t": 0.3}, 4: {"dino": 0.7, "clip_t": 0.2}}]  # 2.5+3 = 3.5+2
    assert select_best_per_prompt(units, ["dino", "clip_t"])[0] == [2]
    units = [{2: {"dino": 0.4, "clip_t": 0.3}, 4: {"dino": 0.4, "clip_t": 0.2}}]  # DINO constant
    assert select_best_per_prompt(units, ["dino", "clip_t"])[0] == [2]


def test_drift_is_one_minus_mean_cosine_and_matched_pairs_cycle_photos():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert drift_from_features(a, b).mean == pytest.approx(1 - (1 / math.sqrt(2) + 1.0) / 2)
    assert drift_from_features(a, a).mean == pytest.approx(0.0, abs=1e-12)
    assert matched_rows([2, 1, 2], 2).tolist() == [0, 0, 1, 0, 0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base, root = tiny_sd_path(), tmp_path_factory.mktemp("protocol-runs")
    cfg = TrainConfig(pretrained_model_name_or_path=str(base), instance_data_dir=str(DOG),
                      instance_prompt="a photo of sks dog", class_prompt="a photo of dog",
                      output_dir=str(root / "nb"), max_train_steps=4, checkpointing_steps=2,
                      learning_rate=1e-2, seed=0, report_to="none", rank=4, norm_bound=1.0)  # fmt: skip
    train(cfg)
    return base, root / "nb"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol-models")
    m = metric_models_path()
    return {"dino": m.dino, "clip": m.clip, "alex": m.lpips, "dinov2": make_dinov2(root / "dinov2"),
            "vgg": make_lpips(root / "lpips_vgg.pth", net="vgg")}  # fmt: skip


def _score(base, run, out, protocol, models, *extra):
    dino = models["dinov2"] if protocol == "peft-image-gen" else models["dino"]
    lpips = models["vgg"] if protocol == "nblora-paper" else models["alex"]
    args = ["score", "--protocol", protocol, "--base_model", str(base), "--adapters", str(run),
            "--instance_dir", str(DOG), "--prompts", "dreambooth-live", "--max_prompts", "2",
            "--images_per_prompt", "2", "--num_inference_steps", "2", "--out", str(out),
            "--dino_model", str(dino), "--clip_model", str(models["clip"]), "--lpips_model", str(lpips),
            "--lpips_size", "64", *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def _images(out, ckpt):
    folder = out / "images" / "nb" / ckpt
    return [[Image.open(folder / f"p{i:02d}_{j}.png").convert("RGB") for j in range(2)] for i in range(2)]


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double()[None], b.double()[None]))


def _mean(xs):
    return sum(xs) / len(xs)


def test_peft_image_gen_pairs_each_prompt_with_its_photo_and_drift_vanishes_at_delta_zero(
    run, models, tmp_path, one_thread
):
    base, folder = run
    drift_file = tmp_path / "drift.txt"
    drift_file.write_text("a photo of {class_noun}\nan astronaut riding a horse\n")
    out = tmp_path / "peft"
    report = _score(base, folder, out, "peft-image-gen", models, "--sweep_delta", "0,1",
                    "--drift_prompts", str(drift_file))  # fmt: skip
    assert report["metrics"] == ["dino", "drift"] and report["protocol"]["selection"] == "final"
    dino = DinoFeatures(str(models["dinov2"]), CPU)
    R = dino.features([Image.open(p).convert("RGB") for p in list_images(DOG)])
    rows = {r["name"]: r for r in report["checkpoints"]}
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        G = [dino.features(g) for g in _images(out, ckpt)]
        want = _mean([_cos(G[k][j], R[k]) for k in range(2) for j in range(2)])  # prompt k <-> photo k
        assert rows[ckpt]["metrics"]["dino"]["pairs"] == 4
        assert rows[ckpt]["metrics"]["dino"]["mean"] == pytest.approx(want, abs=TOL)
    assert report["settings"]["drift_texts"] == ["a photo of dog", "an astronaut riding a horse"]
    zero, one = rows["checkpoint-4@delta0"], rows["checkpoint-4@delta1"]
    assert zero["metrics"]["drift"]["mean"] == pytest.approx(0.0, abs=1e-9)  # δ' = 0 is the base model
    assert one["metrics"] == rows["checkpoint-4"]["metrics"]  # δ' = δ: the adapter as trained
    assert rows["checkpoint-4"]["metrics"]["drift"]["mean"] > 1e-6  # and it did move away
    assert report["selected"][0]["step"] == 4 and "test dino_similarity" in (out / "report.md").read_text()
    assert (out / "plots" / "sweep_drift.png").stat().st_size > 1000


def test_nblora_paper_keeps_the_token_uses_lpips_to_the_photos_and_best_step_per_prompt(
    run, models, tmp_path, one_thread
):
    base, folder = run
    out = tmp_path / "hra"
    report = _score(base, folder, out, "nblora-paper", models, "--metrics", "dino,clip_i,clip_t,lpips_ref")
    assert report["settings"]["clip_t_texts"] == report["settings"]["prompts"]  # "a sks dog ..." kept
    assert report["settings"]["metrics"]["lpips_net"] == "vgg"
    clip = ClipFeatures(str(models["clip"]), None, CPU)
    lp = LpipsFeatures("vgg", str(models["vgg"]), CPU, size=64)
    photos = [Image.open(p).convert("RGB") for p in list_images(DOG)]
    RC, RL = clip.features(photos), lp.features(photos)
    T = clip.text_features(report["settings"]["prompts"])
    units = [{}, {}]
    for row in report["checkpoints"]:
        groups = _images(out, row["name"])
        for k, g in enumerate(groups):
            G = clip.features(g)
            clip_i = _mean([_cos(G[j], RC[r]) for j in range(2) for r in range(len(photos))])
            clip_t = _mean([_cos(G[j], T[k]) for j in range(2)])
            lpips = float(lp.pairwise(lp.features(g), RL).double().mean())
            got = row["per_prompt"]
            assert got["clip_i"][k]["mean"] == pytest.approx(clip_i, abs=TOL)
            assert got["clip_t"][k]["mean"] == pytest.approx(clip_t, abs=TOL)
            assert got["lpips_ref"][k]["mean"] == pytest.approx(lpips, abs=1e-4)
            units[k][row["step"]] = {m: v[k]["mean"] for m, v in got.items()}
    steps, means = select_best_per_prompt(units, ["dino", "clip_i", "clip_t", "lpips_ref"])
    sel = report["selected"][0]
    assert sel["rule"] == "best_per_prompt" and sel["step"] == ",".join(map(str, steps))
    assert sel["clip_t"] == pytest.approx(means["clip_t"]) and sel["dino"] == pytest.approx(means["dino"])


def test_dreambooth_removes_the_token_and_reports_diversity_at_the_last_step(
    run, models, tmp_path, one_thread
):
    base, folder = run
    out = tmp_path / "db"
    report = _score(base, folder, out, "dreambooth", models, "--metrics", "dino,clip_t,lpips_div")
    assert report["settings"]["clip_t_texts"][0] == "a dog in the jungle"
    dino = DinoFeatures(str(models["dino"]), CPU)
    lp = LpipsFeatures("alex", str(models["alex"]), CPU, size=64)
    R = dino.features([Image.open(p).convert("RGB") for p in list_images(DOG)])
    row = report["checkpoints"][-1]
    groups = _images(out, row["name"])
    want = _mean([_cos(dino.features(g)[j], R[r]) for g in groups for j in range(2) for r in range(len(R))])
    div = _mean([float(lp.pairwise(lp.features(g[:1]), lp.features(g[1:]))) for g in groups])  # 1 pair each
    assert row["metrics"]["dino"]["mean"] == pytest.approx(want, abs=TOL)
    assert row["metrics"]["lpips_div"]["mean"] == pytest.approx(div, abs=1e-4)
    sel = report["selected"][0]
    assert (sel["rule"], sel["step"]) == ("final", 4) and sel["dino"] == pytest.approx(want, abs=TOL)
    assert "| DIV |" in (out / "report.md").read_text()
