"""Robust photo loading and deterministic DreamBooth data (no model needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nblora_diffusion.training.data import DreamBoothDataset, EpochSampler, collate, load_photos, to_rgb

DOG = Path(__file__).resolve().parents[1] / "assets" / "dreambooth" / "dog"


def _gradient(w: int = 48, h: int = 32) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0)
    return Image.fromarray(np.concatenate([x, 255 - x, np.full_like(x, 60)], axis=2), "RGB")


def test_exif_orientation_is_applied(tmp_path):
    image = _gradient(48, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    (photo,) = load_photos(tmp_path)
    assert photo.image.size == (32, 48) and photo.image.mode == "RGB"


def test_jpeg_png_webp_all_load(tmp_path):
    for suffix in ("jpg", "png", "webp"):
        _gradient().save(tmp_path / f"a.{suffix}")
    assert [p.path.suffix for p in load_photos(tmp_path)] == [".jpg", ".png", ".webp"]


def test_alpha_images_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    out = np.asarray(to_rgb(rgba))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (255, 0, 0)
    la = Image.new("LA", (2, 2), (0, 128))  # half-transparent black
    assert tuple(np.asarray(to_rgb(la))[0, 0]) == (127, 127, 127)
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 255] + [0] * 765)
    p.info["transparency"] = 0
    assert tuple(np.asarray(to_rgb(p))[0, 0]) == (255, 255, 255)


def test_cmyk_and_palette_convert_to_the_same_colour():
    rgb = _gradient()
    for other in (rgb.convert("CMYK"), rgb.quantize(256).convert("P")):
        diff = np.abs(np.asarray(to_rgb(other), dtype=int) - np.asarray(rgb, dtype=int))
        assert diff.mean() < 8, other.mode


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 0, ~50%, 100% of the 16-bit range
    Image.fromarray(values).save(tmp_path / "gray16.png")
    (photo,) = load_photos(tmp_path)
    assert np.asarray(photo.image)[0, :, 0].tolist() == [0, 128, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb(as_float))[0, :, 0].tolist() == [0, 128, 255]


def test_corrupt_and_non_image_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    _gradient().save(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("not an image")
    good = (DOG / "00.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        photos = load_photos(tmp_path)
    assert [p.path.name for p in photos] == ["good.png"]
    assert "notes.txt" in caplog.text and "truncated.jpg" in caplog.text


def test_folder_without_valid_images_is_a_one_line_error(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no valid instance images in .*a\.txt") as info:
        load_photos(tmp_path)
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ValueError, match="not found"):
        load_photos(tmp_path / "missing")


def test_tiny_images_are_upsampled_with_a_warning(tmp_path, caplog):
    _gradient(12, 10).save(tmp_path / "tiny.png")
    with caplog.at_level(logging.WARNING):
        photos = load_photos(tmp_path, min_size=32)
    assert "tiny.png" in caplog.text and "upsampled" in caplog.text
    item = DreamBoothDataset(photos, 32)[0]["instance"]
    assert item["pixel_values"].shape == (3, 32, 32)


def test_augmentation_depends_only_on_seed_epoch_and_index():
    photos = load_photos(DOG)
    ds = DreamBoothDataset(photos, 32, random_flip=True, seed=7)
    first = [ds[i]["instance"]["pixel_values"] for i in range(len(ds))]
    torch.manual_seed(123)  # the global RNG must not matter
    again = [ds[i]["instance"]["pixel_values"] for i in range(len(ds))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    ds.set_epoch(1)
    other = [ds[i]["instance"]["pixel_values"] for i in range(len(ds))]
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(float(x.min()) >= -1 and float(x.max()) <= 1 for x in first)


def test_center_crop_keeps_the_middle_and_reports_sdxl_crop_coordinates():
    photos = load_photos(DOG)
    item = DreamBoothDataset(photos, 32, center_crop=True)[0]["instance"]
    h, w = item["original_size"]
    top, left = item["crop_top_left"]
    assert min(h, w) == 32 and (top, left) == (round((h - 32) / 2), round((w - 32) / 2))


def test_epoch_sampler_gives_a_fresh_permutation_per_epoch():
    sampler = EpochSampler(10, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(10)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(10)) and list(sampler) != epoch0


def test_collate_puts_instance_examples_before_class_examples():
    photos = load_photos(DOG)
    ds = DreamBoothDataset(photos[:2], 32, class_photos=photos[2:], seed=0)
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["num_instance"] == 2
    assert torch.equal(batch["pixel_values"][2], ds[0]["class"]["pixel_values"])
    assert len(ds) == 3  # max(instance, class): every class image is seen each epoch
