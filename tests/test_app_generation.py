"""Generate-tab handlers on the tiny offline model: the δ' slider, seeds, settings, adapter switching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from nblora_diffusion.app_logic import AppHandlers, generation
from nblora_diffusion.app_logic.evaluation import Evaluator
from nblora_diffusion.diffusion import add_nblora, load_pipeline, make_config, save_adapter
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.testing.metric_models import metric_models_path

DOG_DIR = Path(__file__).resolve().parents[1] / "assets" / "dreambooth" / "dog"
PROMPT = "a photo of sks dog"
STEPS = 2
GUIDANCE = 1.0  # no classifier-free guidance: half the UNet work (one test covers guidance > 1)


def _make_adapter(folder, delta: float, seed: int, p="2"):
    """A saved adapter with random (non-zero) weights: the same files training writes."""
    base = str(tiny_sd_path())
    pipe = load_pipeline(base)
    add_nblora(pipe, make_config(4, p, delta=delta))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in pipe.unet.named_parameters():
            if "nblora_" in name:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return save_adapter(pipe, folder, base_model=base, token="sks")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    handlers = AppHandlers(str(tiny_sd_path()), root)
    a = _make_adapter(handlers.adapters_dir / "run-a", delta=1.5, seed=1)
    b = _make_adapter(handlers.adapters_dir / "run-b", delta=0.5, seed=2, p="inf")
    return handlers, str(a), str(b)


def _images(items) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path, _ in items]


_MEMO: dict = {}


def _gen(h: AppHandlers, folder, delta_prime, seed=7, n=1, side=False, random_seed=False):
    return h.generate(folder, PROMPT, "", seed, random_seed, n, STEPS, GUIDANCE, delta_prime, side)


def _image(h: AppHandlers, folder, delta_prime, seed=7) -> np.ndarray:
    """One adapter image, memoised: generation is deterministic given these arguments."""
    key = (id(h), folder, delta_prime, seed)
    if key not in _MEMO:
        _MEMO[key] = _images(_gen(h, folder, delta_prime, seed=seed)[0])[0]
    return _MEMO[key]


def test_slider_at_zero_is_exactly_the_base_model(app):
    h, a, _ = app
    items, _, _ = _gen(h, a, 0.0, n=2)
    base = load_pipeline(str(tiny_sd_path()))
    ref = generation.run_pipeline(base, PROMPT, None, [7, 8], STEPS, GUIDANCE)
    for got, want in zip(_images(items), ref, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))
    _MEMO[(id(h), a, 0.0, 7)] = _images(items)[0]


def test_moving_the_slider_changes_the_image_and_delta_is_the_trained_one(app):
    h, a, _ = app
    at = {dp: _image(h, a, dp) for dp in (0.0, 0.75, 1.5, 3.0)}
    keys = list(at)
    for i, x in enumerate(keys):
        for y in keys[i + 1 :]:
            assert not np.array_equal(at[x], at[y]), (x, y)
    np.testing.assert_array_equal(_image(h, a, None), at[1.5])  # None: the adapter's own δ


def test_side_by_side_puts_the_base_image_before_each_adapter_image(app):
    h, a, _ = app
    args = (a, PROMPT, "blurry", 7)
    items, settings, _ = h.generate(*args, False, 2, STEPS, 7.5, 1.5, True)
    assert [s["variant"] for s in settings] == ["base", "adapter", "base", "adapter"]
    assert [s["seed"] for s in settings] == [7, 7, 8, 8]
    assert {s["negative_prompt"] for s in settings} == {"blurry"} and {s["guidance"] for s in settings} == {
        7.5
    }
    base_only, _, _ = h.generate(*args, False, 2, STEPS, 7.5, 0.0, False)
    adapter_only, _, _ = h.generate(*args, False, 2, STEPS, 7.5, 1.5, False)
    want = [base_only[0], adapter_only[0], base_only[1], adapter_only[1]]
    for got, ref in zip(_images(items), _images(want), strict=True):
        np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(_images(items)[0], _images(items)[1])
    assert items[0][1].startswith("base") and items[1][1].startswith("δ'=1.5")


def test_each_image_keeps_its_settings_in_the_png(app):
    h, a, _ = app
    items, settings, seed = _gen(h, a, 0.9, seed=123, n=2)
    assert seed == 123
    for (path, _), s in zip(items, settings, strict=True):
        stored = generation.read_image_settings(path)
        assert stored == {k: v for k, v in s.items() if k != "file"}
    assert settings[1]["seed"] == 124 and settings[0]["delta_prime"] == 0.9
    assert settings[0]["prompt"] == PROMPT and settings[0]["steps"] == STEPS and settings[0]["delta"] == 1.5


def test_random_seed_is_reported_and_reproduces_the_image(app):
    h, a, _ = app
    items, _, seed = _gen(h, a, 1.0, seed=0, random_seed=True)
    again, _, seed2 = _gen(h, a, 1.0, seed=seed)
    assert seed2 == seed
    np.testing.assert_array_equal(_images(items)[0], _images(again)[0])


def test_switching_adapters_replaces_the_loaded_one(app):
    h, a, b = app
    img_a = _image(h, a, 0.75)
    img_b = _images(_gen(h, b, 0.75)[0])[0]
    assert not np.array_equal(img_a, img_b)
    np.testing.assert_array_equal(_images(_gen(h, a, 0.75)[0])[0], img_a)
    pipe = h.cache.base(str(tiny_sd_path()))
    assert not any("nblora" in n for n, _ in pipe.unet.named_parameters())


def test_adapter_choices_and_slider_range_follow_the_config(app):
    h, a, b = app
    update = h.adapter_choices()
    values = [v for _, v in update["choices"]]
    assert set(values) == {a, b}
    text, slider = h.adapter_selected(b)
    assert "δ = 0.5" in text and "sks" in text
    assert slider["maximum"] == 1.0 and slider["value"] == 0.5 and slider["minimum"] == 0.0
    assert h.slider_label(0.25, b) == "δ'/δ = 0.50"
    assert "base model" in h.slider_label(0, b)


@pytest.mark.parametrize(
    "folder, prompt, match",
    [
        (None, PROMPT, "pick an adapter"),
        ("/nonexistent/adapter", PROMPT, "adapter folder not found"),
        ("ADAPTER", "   ", "enter a prompt"),
    ],
)
def test_bad_generate_input_is_a_one_line_page_error(app, folder, prompt, match):
    h, a, _ = app
    folder = a if folder == "ADAPTER" else folder
    with pytest.raises(gr.Error, match=match) as e:
        h.generate(folder, prompt, "", 0, False, 1, STEPS, GUIDANCE, 1.0, False)
    assert "\n" not in str(e.value)


def test_folder_without_config_is_not_an_adapter(app, tmp_path):
    h, _, _ = app
    with pytest.raises(gr.Error, match="not an NB-LoRA adapter folder"):
        h.generate(str(tmp_path), PROMPT, "", 0, False, 1, STEPS, GUIDANCE, 1.0, False)
    text, _ = h.adapter_selected(str(tmp_path))
    assert "not an NB-LoRA adapter folder" in text


def test_slider_release_redraws_only_after_a_first_generate(app):
    h, a, _ = app
    none = h.regenerate_on_slider(a, PROMPT, "", None, 1, STEPS, GUIDANCE, 1.0, False)
    assert all(u == gr.update() for u in none)
    items, _, seed = h.regenerate_on_slider(a, PROMPT, "", 7, 1, STEPS, GUIDANCE, 0.75, False)
    assert seed == 7
    np.testing.assert_array_equal(_images(items)[0], _image(h, a, 0.75))


def test_evaluate_scores_each_group_as_the_metric_suite_does(app):
    h, a, _ = app
    config = metric_models_path().config()
    h.evaluator = Evaluator(config)
    _, settings, _ = h.generate(a, PROMPT, "", 7, False, 2, STEPS, GUIDANCE, 1.5, True)
    table = h.evaluate(a, str(DOG_DIR), settings)
    assert list(table.columns) == [
        "images",
        "variant",
        "δ'",
        "dino",
        "clip_i",
        "clip_t",
        "lpips_div",
        "lpips_ref",
    ]
    rows = table.to_dict("records")
    assert [(r["images"], r["variant"], r["δ'"]) for r in rows] == [(2, "base", 0.0), (2, "adapter", 1.5)]
    suite = h.evaluator.suite()  # the loaded models: this checks grouping, images and texts
    for row, variant in zip(rows, ("base", "adapter"), strict=True):
        images = [Image.open(s["file"]).convert("RGB") for s in settings if s["variant"] == variant]
        direct = suite.score(sorted(DOG_DIR.glob("*.jpg")), [images], ["a photo of dog"])  # token stripped
        for metric, stat in direct.items():
            assert row[metric] == pytest.approx(stat.mean, abs=1e-4), (variant, metric)


@pytest.mark.parametrize(
    "photos, settings, match",
    [
        (str(DOG_DIR), [], "generate some images first"),
        ("", None, "give the folder of the subject photos"),
        ("/no/such/photos", None, "image folder not found"),
    ],
)
def test_evaluate_bad_input_is_a_page_error(app, photos, settings, match):
    h, a, _ = app
    if settings is None:
        settings = h.generate(a, PROMPT, "", 7, False, 1, STEPS, GUIDANCE, 1.5, False)[1]
    with pytest.raises(gr.Error, match=match):
        h.evaluate(a, photos, settings)


def test_adapter_whose_base_model_is_gone_uses_the_apps_base_model(app, tmp_path):
    h, a, _ = app
    moved = tmp_path / "moved"
    shutil.copytree(a, moved)
    config = json.loads((moved / "nblora_config.json").read_text())
    config["base_model"] = "/gone/tiny-sd"
    (moved / "nblora_config.json").write_text(json.dumps(config))
    np.testing.assert_array_equal(_images(_gen(h, str(moved), 0.75)[0])[0], _image(h, a, 0.75))
    with pytest.raises(gr.Error, match="start the app with --base_model"):
        _gen(AppHandlers(None, tmp_path / "other"), str(moved), 0.75)
