"""Protocol presets end to end (`python -m eval score --protocol NAME` on the tiny SD and random-weight
metric models), checked against features computed here and paired/aggregated by hand; drift, the
slider sweep, HRA's best-step-per-prompt rule, its 512 x 512 squashed LPIPS inputs and its all-black
images left out."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval.score
import nblora_diffusion.metrics.suite
from eval.cli import main
from nblora_diffusion.metrics import (
    MetricConfig,
    drift_from_features,
    get_protocol,
    list_images,
    select_best_per_prompt,
)
from nblora_diffusion.metrics.extractors import ClipFeatures, DinoFeatures, LpipsFeatures
from nblora_diffusion.metrics.protocols import drop_black, drop_black_pairs, is_black
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


def _score(base, run, out, protocol, models, *extra, lpips_size=64):
    """``lpips_size=None``: the protocol's (512 under nblora-paper)."""
    dino = models["dinov2"] if protocol == "peft-image-gen" else models["dino"]
    lpips = models["vgg"] if protocol == "nblora-paper" else models["alex"]
    size = ["--lpips_size", str(lpips_size)] if lpips_size else []
    args = ["score", "--protocol", protocol, "--base_model", str(base), "--adapters", str(run),
            "--instance_dir", str(DOG), "--prompts", "dreambooth-live", "--max_prompts", "2",
            "--images_per_prompt", "2", "--num_inference_steps", "2", "--out", str(out),
            "--dino_model", str(dino), "--clip_model", str(models["clip"]), "--lpips_model", str(lpips),
            *size, *extra]  # fmt: skip
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
    clip = ClipFeatures(str(models["clip"]), None, CPU, center_crop=False)
    lp = LpipsFeatures("vgg", str(models["vgg"]), CPU, size=64, resize="squash", center_crop=False)
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


def _black(size=(64, 64), mode="RGB"):
    return Image.new(mode, size)


def test_all_black_images_are_dropped_and_counted_and_near_black_ones_kept():
    grey, almost = Image.new("RGB", (8, 8), (40, 40, 40)), _black((8, 8))
    almost.putpixel((3, 5), (0, 0, 1))  # one blue level in one pixel: not the safety checker's image
    assert is_black(_black()) and is_black(_black(mode="L")) and not is_black(almost) and not is_black(grey)
    kept, n = drop_black([[_black(), grey], [_black(mode="L")], [almost], []])
    assert n == 2 and [len(g) for g in kept] == [1, 0, 1, 0] and kept[0][0] is grey
    a, b, n = drop_black_pairs([grey, _black(), grey, almost], [grey, grey, _black(), almost])
    assert n == 2 and a == [grey, almost] and b == [grey, almost]


def test_nblora_paper_preset_squashes_lpips_inputs_to_512_and_skips_black_images():
    p = get_protocol("nblora-paper")
    assert (p.lpips_size, p.lpips_resize, p.center_crop, p.skip_black) == (512, "squash", False, True)
    config = p.metric_config()
    assert (config.lpips_size, config.lpips_resize, config.center_crop) == (512, "squash", False)
    assert config.describe()["lpips_resize"] == "squash"
    assert "lpips_resize" not in MetricConfig().describe()  # earlier reports keep their fingerprints
    d = get_protocol("default")
    assert (d.lpips_resize, d.center_crop, d.skip_black) == ("crop", True, False)
    with pytest.raises(ValueError, match="lpips_resize"):
        MetricConfig(lpips_resize="pad")


def test_lpips_squash_keeps_the_whole_image_where_crop_cuts_its_sides(models):
    wide = Image.new("RGB", (64, 32))  # 2:1, its left quarter white, the rest black
    wide.paste((255, 255, 255), (0, 0, 16, 32))
    squash = LpipsFeatures("vgg", str(models["vgg"]), CPU, size=32, resize="squash")._pixels([wide])
    crop = LpipsFeatures("vgg", str(models["vgg"]), CPU, size=32, resize="crop")._pixels([wide])
    assert squash.shape == crop.shape == (1, 3, 32, 32)
    assert torch.all(squash[..., :7] == 1) and torch.all(squash[..., 9:] == -1)  # the white quarter: 8 px
    assert torch.all(crop == -1)  # the center square (x 16..48) is all black


class _FakeTrunk(torch.nn.Module):
    """Stands in for LPIPS's VGG: records the input size, returns cheap features of LPIPS's layer widths
    (VGG at 512 px is too slow for a test on a CPU)."""

    def __init__(self, channels, sizes):
        super().__init__()
        self.channels, self.sizes = channels, sizes

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4)  # (B, 3, S, S) -> (B, 3, 4, 4)
        return [pooled.repeat(1, -(-c // 3), 1, 1)[:, :c] for c in self.channels]  # (B, C_l, 4, 4)


def _spy_lpips(sizes):
    class SpyLpips(LpipsFeatures):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model.net = _FakeTrunk([lin.model[-1].weight.shape[1] for lin in self.model.lins], sizes)

    return SpyLpips


def test_nblora_paper_leaves_black_images_out_of_every_score_and_counts_them(
    run, models, tmp_path, monkeypatch, one_thread
):
    base, folder = run
    sizes: list[tuple[int, int]] = []
    monkeypatch.setattr(nblora_diffusion.metrics.suite, "LpipsFeatures", _spy_lpips(sizes))
    real_generate = eval.score.generate

    def generate(pipe, prompts, gen, desc=""):  # the safety checker blacks out two of checkpoint-4's images
        groups = real_generate(pipe, prompts, gen, desc=desc)
        if desc == "generating checkpoint-4":
            groups[0][1] = _black(groups[0][1].size)  # prompt 0, image 1
        if desc == "drift checkpoint-4":
            groups[1][0] = _black(groups[1][0].size)  # drift prompt 1, image 0
        return groups

    monkeypatch.setattr(eval.score, "generate", generate)
    out = tmp_path / "hra-black"
    report = _score(base, folder, out, "nblora-paper", models, "--metrics", "dino,clip_t,lpips_ref,drift",
                    lpips_size=None)  # fmt: skip
    assert report["protocol"]["skip_black"] is True
    assert report["settings"]["metrics"]["lpips_size"] == 512
    assert sizes and set(sizes) == {(512, 512)}  # photos and generated images, squashed to 512 x 512
    rows = {r["name"]: r for r in report["checkpoints"]}
    n_real = len(list_images(DOG))
    two, four = rows["checkpoint-2"], rows["checkpoint-4"]
    assert (two["black_images"], two["black_drift_pairs"]) == (0, 0)
    assert (four["black_images"], four["black_drift_pairs"]) == (1, 1)
    assert [x["pairs"] for x in two["per_prompt"]["dino"]] == [2 * n_real, 2 * n_real]
    assert [x["pairs"] for x in four["per_prompt"]["dino"]] == [n_real, 2 * n_real]  # image (0, 1) out
    assert [x["pairs"] for x in four["per_prompt"]["clip_t"]] == [1, 2]
    assert [x["pairs"] for x in four["per_prompt"]["lpips_ref"]] == [n_real, 2 * n_real]
    assert (two["metrics"]["drift"]["pairs"], four["metrics"]["drift"]["pairs"]) == (4, 3)
    # prompt 0 of checkpoint-4 is scored on its one image that is not black, by hand
    kept = _images(out, "checkpoint-4")[0][0]
    assert is_black(_images(out, "checkpoint-4")[0][1])  # the saved images are the ones generated
    photos = [Image.open(p).convert("RGB") for p in list_images(DOG)]
    dino = DinoFeatures(str(models["dino"]), CPU, center_crop=False)
    R, g = dino.features(photos), dino.features([kept])[0]
    want = _mean([_cos(g, R[r]) for r in range(n_real)])
    assert four["per_prompt"]["dino"][0]["mean"] == pytest.approx(want, abs=TOL)
    lp = _spy_lpips([])("vgg", str(models["vgg"]), CPU, size=512, resize="squash", center_crop=False)
    lpips = float(lp.pairwise(lp.features([kept]), lp.features(photos)).double().mean())
    assert four["per_prompt"]["lpips_ref"][0]["mean"] == pytest.approx(lpips, abs=1e-4)
    md = (out / "report.md").read_text()
    assert "| black |" in md and "left out of the scores" in md


def test_benchmark_report_counts_black_images_per_step_over_subjects(tmp_path):
    from eval.methods import Method
    from eval.tables import write_benchmark_report

    def stat(v, n=4):
        return {"mean": v, "sum": v * n, "pairs": n}

    def row(step, black):
        return {"run": "m", "name": f"checkpoint-{step}", "step": step, "black_images": black,
                "metrics": {"dino": stat(0.5), "clip_t": stat(0.3)}}  # fmt: skip

    reports = {
        (s, "m"): {"checkpoints": [row(2, b2), row(4, b4)], "real": {"dino": stat(0.8), "clip_t": stat(0.3)}}
        for s, b2, b4 in (("dog", 1, 2), ("cat", 0, 3))
    }
    method = Method(id="m", name="LoRA", options={"adapter": "lora"})
    paths = write_benchmark_report(tmp_path, [method], ["dog", "cat"], reports, ("dino", "clip_t"))
    results = json.loads(paths["json"].read_text())
    assert results["methods"][0]["black_images"] == {"2": 1, "4": 5}
    assert "- LoRA: step 2: 1, step 4: 5" in paths["md"].read_text()
