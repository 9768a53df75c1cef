"""Upload validation and the δ hints of the app's Train tab (no models needed)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from nblora_diffusion.app_logic import uploads
from nblora_diffusion.app_logic.uploads import (
    check_uploads,
    default_delta,
    delta_hint,
    delta_range,
    save_instance_images,
)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "dreambooth"
DOG = sorted((ASSETS / "dog").glob("*.jpg"))
BACKPACK = sorted((ASSETS / "backpack").glob("*.jpg"))


def _png(path: Path, size=(80, 60), color=(200, 30, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def test_bundled_dog_photos_pass_without_warnings():
    check = check_uploads(DOG, resolution=64)
    assert check.images == DOG
    assert check.warnings == []


def test_non_image_is_rejected_naming_the_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"notes\.txt: not an image.*fake\.jpg: not an image") as e:
        check_uploads([*DOG, notes, fake])
    assert "\n" not in str(e.value)


def test_truncated_jpeg_is_rejected(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(DOG[0].read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"broken\.jpg: cannot decode"):
        check_uploads([*DOG, broken])


@pytest.mark.parametrize("n", [0, 1, 2])
def test_fewer_than_three_photos_is_an_error(n):
    with pytest.raises(ValueError, match="at least 3|upload 3-30"):
        check_uploads(DOG[:n])


def test_more_than_thirty_files_is_an_error(tmp_path):
    paths = [_png(tmp_path / f"{i}.png", color=(i, 0, 0)) for i in range(31)]
    with pytest.raises(ValueError, match="at most 30"):
        check_uploads(paths)
    assert len(check_uploads(paths[:30]).images) == 30


def test_file_over_the_size_limit_is_rejected_before_decoding(tmp_path):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:  # sparse file: the size check must come before any decoding
        f.truncate(uploads.MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=r"huge\.jpg: .* MB is over the 20\.0 MB limit"):
        check_uploads([*DOG, huge])


def test_decompression_bomb_is_rejected_by_pixel_count(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP but a tiny file
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match=r"bomb\.png: 9000x9000 pixels is over the 64 MP limit"):
        check_uploads([*DOG, bomb])


def test_warnings_for_count_small_images_and_duplicates(tmp_path):
    small = [_png(tmp_path / f"s{i}.png", size=(40, 40), color=(10 * i, 0, 0)) for i in range(2)]
    dup = tmp_path / "copy.jpg"
    shutil.copyfile(DOG[0], dup)
    check = check_uploads([DOG[0], dup, *small], resolution=64)
    text = " | ".join(check.warnings)
    assert "4 photos" in text
    assert "smaller than 64 px" in text and "s0.png" in text and "s1.png" in text
    assert "copy.jpg looks like a duplicate of 00.jpg" in text


def test_saved_instance_folder_holds_exact_copies(tmp_path):
    dest = save_instance_images(BACKPACK, tmp_path / "instance")
    copies = sorted(dest.iterdir())
    assert [c.read_bytes() for c in copies] == [p.read_bytes() for p in BACKPACK]
    with pytest.raises(ValueError, match="already exists"):
        save_instance_images(BACKPACK, dest)


def test_failed_copy_leaves_no_folder_behind(tmp_path):
    missing = tmp_path / "gone.jpg"
    with pytest.raises(FileNotFoundError):
        save_instance_images([DOG[0], missing], tmp_path / "instance")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("p", ["1", "2", "∞", 3.0])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_delta_range_scales_as_rank_to_the_one_over_p(p, rank):
    lo, hi = delta_range(p, rank)
    lo1, hi1 = delta_range(p, 1)
    pv = uploads.p_value(p)
    factor = 1.0 if math.isinf(pv) else rank ** (1 / pv)
    assert lo == pytest.approx(lo1 * factor) and hi == pytest.approx(hi1 * factor)
    assert lo < default_delta(p, rank) < hi


def test_delta_hint_names_the_norm_and_the_range():
    assert "Frobenius" in delta_hint("2", 4) and "0.5–2" in delta_hint("2", 4)
    assert "spectral" in delta_hint("∞", 4)
    assert "nuclear" in delta_hint("1", 4)
    with pytest.raises(ValueError, match="norm p must be >= 1"):
        delta_hint("0.5", 4)
