"""The metric models on random-weight copies of the real architectures, loaded through their real loaders."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from nblora_diffusion.metrics import LpipsFeatures, MetricConfig, MetricSuite, list_images, open_image
from nblora_diffusion.testing.metric_models import metric_models_path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "dreambooth"


@pytest.fixture(scope="module")
def models():
    return metric_models_path()


def _config(models, **overrides):
    return models.config(**{"device": "cpu", "lpips_size": 64, **overrides})  # small LPIPS input: CPU time


@pytest.fixture(scope="module")
def suite(models):
    return MetricSuite(_config(models)).load()


def _random_images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray((torch.rand(size, size + 8, 3, generator=g) * 255).byte().numpy()) for _ in range(n)
    ]


def test_lpips_pairwise_from_features_equals_lpips_forward_on_every_pair(suite):
    lp: LpipsFeatures = suite._lpips
    a, b = _random_images(3, seed=1), _random_images(2, seed=2)
    xa, xb = lp._pixels(a), lp._pixels(b)
    with torch.no_grad():  # lpips.LPIPS.forward on the same pixels, one call per pair
        expected = torch.stack(
            [lp.model(xa[i : i + 1].expand(2, -1, -1, -1), xb).flatten() for i in range(3)]
        )
    got = lp.pairwise(lp.features(a), lp.features(b))
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_lpips_pair_counts_and_chunking_do_not_change_scores(models):
    real = list_images(ASSETS / "dog")[:3]
    groups = [_random_images(3, seed=3), _random_images(2, seed=4), _random_images(1, seed=5)]
    texts = ["a dog", "a dog on the beach", "a red dog"]
    big = MetricSuite(_config(models, batch_size=32)).score(real, groups, texts)
    small = MetricSuite(_config(models, batch_size=2)).score(real, groups, texts)
    assert big["lpips_div"].count == 3 + 1 + 0  # pairs within each prompt only
    assert big["lpips_ref"].count == 6 * 3  # every generated image vs every photo
    assert big["dino"].count == big["clip_i"].count == 18
    assert big["clip_t"].count == 6
    for m in big:
        assert small[m].count == big[m].count
        assert small[m].mean == pytest.approx(big[m].mean, rel=1e-5, abs=1e-6), m


def test_identical_images_have_cosine_one_and_lpips_zero(suite):
    photo = list_images(ASSETS / "backpack")[0]
    same = [open_image(photo), open_image(photo)]
    s = suite.score([photo], [same], ["a backpack"])
    assert s["dino"].mean == pytest.approx(1.0, abs=1e-5)
    assert s["clip_i"].mean == pytest.approx(1.0, abs=1e-5)
    assert s["lpips_div"].mean == pytest.approx(0.0, abs=1e-6)
    assert s["lpips_ref"].mean == pytest.approx(0.0, abs=1e-6)


def test_real_reference_row_compares_distinct_photos(suite):
    real = list_images(ASSETS / "dog")
    ref = suite.reference(real, ["a dog in the jungle", "a dog"])
    n = len(real)
    assert ref["dino"].count == ref["clip_i"].count == n * (n - 1)
    assert ref["lpips_ref"].count == n * (n - 1) // 2
    assert ref["clip_t"].count == 2 * n
    assert ref["dino"].mean < 1.0 - 1e-4  # the diagonal (cosine 1) is left out


def test_real_features_are_cached_per_file(models, tmp_path):
    suite = MetricSuite(_config(models, metrics=("dino",))).load()
    calls = []
    embed = suite._dino.features
    suite._dino.features = lambda images: calls.append(len(images)) or embed(images)
    photos = []
    for i, src in enumerate(list_images(ASSETS / "dog")[:2]):
        photos.append(tmp_path / f"{i}.png")
        open_image(src).save(photos[-1])
    first = suite.real_features(photos)["dino"]
    again = suite.real_features(photos[::-1])["dino"]
    assert calls == [2]
    torch.testing.assert_close(again, first.flip(0))
    open_image(list_images(ASSETS / "backpack")[0]).save(photos[0])  # the file changed: embed it again
    os.utime(photos[0], ns=(1, 1))
    suite.real_features(photos)
    assert calls == [2, 1]


def test_same_inputs_give_identical_numbers(models):
    real = list_images(ASSETS / "dog")[:2]
    groups = [_random_images(2, seed=7)]
    one = MetricSuite(_config(models)).score(real, groups, ["a dog"])
    two = MetricSuite(_config(models)).score(real, groups, ["a dog"])
    assert one == two


def test_clip_t_depends_on_the_text(suite):
    real = list_images(ASSETS / "dog")[:1]
    groups = [_random_images(2, seed=8)]
    a = suite.score(real, groups, ["a dog in the jungle"])["clip_t"].mean
    b = suite.score(real, groups, ["a purple backpack on a mirror"])["clip_t"].mean
    assert a != b


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("dino_model", "nblora-test/absent-dino", "DINO model"),
        ("clip_model", "no-such-clip-arch", "CLIP model"),
        ("lpips_model", "/nonexistent/lpips.pth", "LPIPS model file not found"),
    ],
)
def test_missing_metric_model_is_a_clear_error(models, field, value, match):
    with pytest.raises(ValueError, match=match):
        MetricSuite(_config(models, **{field: value})).load()


def test_lpips_file_without_trunk_weights_is_rejected(models):
    import lpips

    linear_only = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    with pytest.raises(ValueError, match="not a full LPIPS alex state dict"):
        MetricSuite(_config(models, lpips_model=str(linear_only), metrics=("lpips_div",))).load()


def test_bad_metric_settings_are_rejected():
    with pytest.raises(ValueError, match="subset"):
        MetricConfig(metrics=("dino", "fid"))
    with pytest.raises(ValueError, match="lpips_net"):
        MetricConfig(lpips_net="resnet")


def test_empty_image_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        list_images(tmp_path / "missing")
