"""The served app through gradio_client: train -> generate -> downloads, on the tiny offline model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from nblora_diffusion.app_logic import generation
from nblora_diffusion.diffusion import load_adapter, load_pipeline
from nblora_diffusion.testing import tiny_sd_path

from app_harness import served_app

DOG = sorted((Path(__file__).resolve().parents[1] / "assets" / "dreambooth" / "dog").glob("*.jpg"))
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with served_app(str(tiny_sd_path()), tmp_path_factory.mktemp("app")) as (url, handlers):
        yield Client(url, verbose=False, download_files=tmp_path_factory.mktemp("downloads")), handlers


def test_train_then_generate_then_download_through_the_api(client, tmp_path):
    c, h = client
    photos = [handle_file(str(p)) for p in DOG]
    checked, status = c.predict(photos, 64, api_name="/check_upload")
    assert len(checked) == 5 and status.startswith("5 photos ready")

    # files, token, class, prior, p, δ, rank, steps, lr, seed, resolution, val prompt, val steps, ckpt steps,
    # class images, validation denoising steps
    job = c.submit(
        photos, "sks", "dog", False, "2", 1.5, 4, 3, 1e-3, 0, 64, "", 3, 3, 10, 2, api_name="/train"
    )
    status, gallery, adapter = job.result(timeout=600)
    assert status.startswith("Finished 3 steps")
    streamed = [o[0] for o in job.outputs()]
    assert any(re.search(r"step [123]/3 · loss \d+\.\d{4} · lr 0\.001 · \d+:\d\d left", s) for s in streamed)
    assert len(gallery) == 2 and all(item["caption"] == "step 3" for item in gallery)
    folder = adapter if isinstance(adapter, str) else adapter["value"]
    assert Path(folder).parent == h.adapters_dir

    info, slider = c.predict(folder, api_name="/select_adapter")
    assert "δ = 1.5" in info and (slider["value"], slider["minimum"], slider["maximum"]) == (1.5, 0.0, 3.0)

    args = (folder, PROMPT, "", 11, False, 1, 2, 1.0)
    items, settings, seed = c.predict(*args, 1.5, False, api_name="/generate")
    assert seed == 11 and settings[0]["delta_prime"] == 1.5 and settings[0]["seed"] == 11
    trained = np.asarray(Image.open(items[0]["image"]))
    base_items, _, _ = c.predict(*args, 0.0, False, api_name="/generate")
    at_zero = np.asarray(Image.open(base_items[0]["image"]))
    assert not np.array_equal(trained, at_zero)
    base = load_pipeline(str(tiny_sd_path()))
    np.testing.assert_array_equal(
        at_zero, np.asarray(generation.run_pipeline(base, PROMPT, None, [11], 2, 1.0)[0])
    )
    load_adapter(base, folder)  # the trained adapter, outside the app: the same image at δ
    np.testing.assert_array_equal(
        trained, np.asarray(generation.run_pipeline(base, PROMPT, None, [11], 2, 1.0)[0])
    )

    files = c.predict(folder, api_name="/downloads")
    names = sorted(Path(f).name for f in files)
    name = Path(folder).name
    assert names == sorted(
        [f"{name}-nblora.zip", "pytorch_lora_weights.safetensors", f"{name}-kohya.safetensors"]
    )


def test_api_errors_are_one_line_messages(client):
    c, _ = client
    with pytest.raises(Exception, match="pick an adapter first"):
        c.predict(None, PROMPT, "", 0, False, 1, 2, 1.0, 1.0, False, api_name="/generate")
    with pytest.raises(Exception, match="at least 3"):
        c.predict([handle_file(str(p)) for p in DOG[:2]], 64, api_name="/check_upload")
    with pytest.raises(Exception, match="choose a stopped training"):
        c.predict(None, api_name="/resume")
