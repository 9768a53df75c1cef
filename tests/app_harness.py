"""Shared pieces of the app tests: load app/app.py, serve it on a free local port, headless Chromium, and
the Train tab's settings of a quick run on the tiny model."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nblora_diffusion.app_logic.train_settings import make_train_config
from nblora_diffusion.testing import tiny_sd_path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; a downloaded browser is never used
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts" / "app"
DOG_DIR = REPO / "assets" / "dreambooth" / "dog"


def app_module():
    """app/app.py imported as a module (app/ is a script folder, not a package)."""
    if "nblora_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("nblora_app", REPO / "app" / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["nblora_app"] = module
        spec.loader.exec_module(module)
    return sys.modules["nblora_app"]


def tiny_train_config(tmp_path: Path, **overrides):
    """The app's TrainConfig (``make_train_config``) of a quick tiny-SD run into ``tmp_path / "run"``."""
    values = dict(
        base_model=str(tiny_sd_path()),
        instance_data_dir=DOG_DIR,
        output_dir=tmp_path / "run",
        token="sks",
        class_noun="dog",
        p="2",
        delta=1.5,
        rank=4,
        max_train_steps=4,
        learning_rate=1e-3,
        seed=0,
        resolution=64,
        validation_steps=2,
        num_validation_images=1,
        validation_inference_steps=2,
        report_to="none",
    )
    values.update(overrides)
    return make_train_config(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served_app(
    base_model: str, output_dir: Path, metric_config=None, form=None
) -> Iterator[tuple[str, object]]:
    """The real app (same build and launch code as the CLI) on 127.0.0.1; yields (url, handlers)."""
    app = app_module()
    demo, handlers = app.create_app(base_model, output_dir, metric_config, form=form)
    url = app.launch_app(demo, output_dir, port=free_port(), prevent_thread_lock=True)
    try:
        yield url, handlers
    finally:
        run = handlers.slot.current
        if run is not None:
            run.stop()
            run._done.wait(300)
        demo.close()


def require_chromium() -> str:
    """Path of Debian's chromium; a failure under CI=true, a skip elsewhere, when it is missing."""
    if CHROMIUM.is_file():
        return str(CHROMIUM)
    msg = f"{CHROMIUM} not found: install Debian's chromium (make browser / apt-get install chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)
