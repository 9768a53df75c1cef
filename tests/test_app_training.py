"""Train-tab logic on the tiny offline model: UI values -> TrainConfig, the one-at-a-time queue, Stop,
progress streaming, each training in a process of its own (its errors and its death), and the downloads of
a trained adapter."""

from __future__ import annotations

import functools
import json
import math
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from train_helpers import exit_without_a_word, fail_after_a_step, get_killed, tiny_config

from nblora_diffusion.app_logic import AppHandlers, generation
from nblora_diffusion.app_logic.training_job import (
    SlotBusy,
    TrainEvent,
    TrainingSlot,
    describe_step,
    failure_message,
)
from nblora_diffusion.core import nblora_state_dict
from nblora_diffusion.diffusion import load_adapter, load_pipeline
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.training import (
    TrainConfig,
    TrainingError,
    TrainingProcessError,
    child_process,
    train_in_child_process,
)

from app_harness import DOG_DIR, tiny_train_config

DOG = sorted(str(p) for p in DOG_DIR.glob("*.jpg"))


def _ui(**overrides):
    """The Train tab's values for a quick tiny-model run (positional order of AppHandlers.start_training)."""
    values = dict(
        files=DOG,
        token="sks",
        class_noun="dog",
        prior_preservation=False,
        p="2",
        delta=1.5,
        rank=4,
        steps=4,
        learning_rate=1e-3,
        seed=0,
        resolution=64,
        validation_prompt="",
        validation_steps=2,
        checkpointing_steps=2,
        num_class_images=10,
        validation_inference_steps=2,
    )
    values.update(overrides)
    return values


@pytest.fixture
def handlers(tmp_path):
    """App handlers on the tiny model; any training still running at the end is stopped and awaited."""
    h = AppHandlers(str(tiny_sd_path()), tmp_path / "app")
    yield h
    run = h.slot.current
    if run is not None:
        run.stop()
        run._done.wait(300)


def test_ui_values_become_the_trainers_options(tmp_path):
    cfg = tiny_train_config(
        tmp_path,
        p="∞",
        delta=0.4,
        rank=8,
        with_prior_preservation=True,
        class_data_dir=tmp_path / "cls",
        num_class_images=12,
    )
    assert cfg.instance_prompt == "a photo of sks dog" and cfg.class_prompt == "a photo of dog"
    assert cfg.validation_prompt == cfg.instance_prompt
    assert (cfg.norm_p, cfg.norm_bound, cfg.rank, cfg.adapter) == ("inf", 0.4, 8, "nblora")
    assert (
        cfg.with_prior_preservation
        and cfg.class_data_dir == str(tmp_path / "cls")
        and cfg.num_class_images == 12
    )
    assert (cfg.max_train_steps, cfg.resolution, cfg.seed, cfg.learning_rate) == (4, 64, 0, 1e-3)
    assert tiny_train_config(tmp_path, p="2").norm_p == "2"
    assert tiny_train_config(tmp_path, max_train_steps=400, validation_steps=None).validation_steps == 100


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("token", "", "token must be one word"),
        ("token", "two words", "token must be one word"),
        ("token", "dog", "token must differ from the class noun"),
        ("class_noun", " ", "class noun"),
        ("max_train_steps", 0, r"steps must be a whole number in \[1, 100000\]"),
        ("max_train_steps", 2.5, "steps must be a whole number"),
        ("learning_rate", -1e-4, "learning rate must be a finite number > 0"),
        ("delta", 0, "δ must be a finite number > 0"),
        ("delta", math.nan, "δ must be a finite number > 0"),
        ("p", "0.5", "norm p must be >= 1"),
        ("resolution", 100, "resolution must be a multiple of 8"),
        ("rank", "four", "rank must be a whole number"),
    ],
)
def test_bad_train_settings_are_one_line_value_errors(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny_train_config(tmp_path, **{field: value})
    assert "\n" not in str(e.value)


def test_step_status_shows_step_loss_and_time_left():
    text = describe_step(TrainEvent("step", 3, 10, loss=0.12345, lr=1e-4, elapsed_s=30.0))
    assert text == "step 3/10 · loss 0.1235 · lr 0.0001 · 1:10 left"


def test_one_training_at_a_time_stop_keeps_a_loadable_checkpoint(tmp_path, handlers):
    h = handlers
    cfg = tiny_train_config(tmp_path, max_train_steps=500, checkpointing_steps=1000, validation_steps=1000)
    run = h.slot.start(cfg, owner="a")
    first = next(e for e in run.events() if e is not None and e.kind == "step")
    assert first.step == 1 and first.max_steps == 500 and np.isfinite(first.loss)

    with pytest.raises(SlotBusy, match="another training is running"):
        h.slot.start(tiny_train_config(tmp_path, output_dir=tmp_path / "other"), owner="b")
    # a second user's start waits with its place shown, and Stop cancels it before it begins
    waiting = h.start_training(*_ui().values(), request=SimpleNamespace(session_hash="b"))
    status, _, _ = next(waiting)
    assert status == "Waiting in the training queue: 1 training(s) ahead of yours."
    assert h.stop_training(SimpleNamespace(session_hash="c")) == ""  # nothing of c's: a no-op
    assert h.stop_training(SimpleNamespace(session_hash="b")) == "Cancelled the waiting training."
    assert [s for s, _, _ in waiting] == ["Cancelled before it started."]
    assert not (h.root / "uploads").exists() or not any((h.root / "uploads").iterdir())
    assert run.running

    assert h.stop_training(SimpleNamespace(session_hash="a")).startswith("Stopping")
    result = run.wait(timeout=300)
    assert result.stopped and 1 <= result.final_step < 500
    assert result.last_checkpoint == cfg_out(cfg) / f"checkpoint-{result.final_step}"
    assert h.slot.current is None

    pipe = load_pipeline(str(tiny_sd_path()))
    info = load_adapter(pipe, result.last_checkpoint)
    assert info["p"] == 2 and info["delta"] == 1.5
    final = load_pipeline(str(tiny_sd_path()))
    load_adapter(final, result.output_dir)
    ckpt_sd, final_sd = nblora_state_dict(pipe.unet), nblora_state_dict(final.unet)
    assert ckpt_sd.keys() == final_sd.keys()
    for k in ckpt_sd:
        torch.testing.assert_close(ckpt_sd[k], final_sd[k], rtol=0, atol=0)


def cfg_out(cfg) -> Path:
    return Path(cfg.output_dir)


def test_training_error_reaches_the_caller_as_one_line(tmp_path, handlers):
    h = handlers
    run = h.slot.start(tiny_train_config(tmp_path, base_model=str(tmp_path / "no-such-model")))
    with pytest.raises(ValueError, match="model path not found") as e:
        run.wait(timeout=120)
    assert "\n" not in str(e.value) and h.slot.current is None


def test_each_training_runs_in_its_own_process_with_its_own_precision_and_stops(tmp_path, handlers):
    """The app's default slot: bf16 then fp32 (accelerate fixes the precision once per process), steps
    streamed back, Stop relayed; the app's own process never sets up accelerate."""
    from accelerate.state import is_initialized

    slot = handlers.slot
    first = slot.start(tiny_config(tmp_path / "bf16", mixed_precision="bf16", max_train_steps=1))
    events = [e for e in first.events() if e is not None]
    assert [(e.kind, e.step, e.max_steps) for e in events if e.kind == "step"] == [("step", 1, 1)]
    assert np.isfinite(events[0].loss) and events[-1].kind == "done"
    assert first.wait(timeout=60).final_step == 1
    assert load_adapter(load_pipeline(str(tiny_sd_path())), tmp_path / "bf16")["p"] == first.config.norm_p

    cfg = tiny_config(tmp_path / "fp32", mixed_precision="no", max_train_steps=500, checkpointing_steps=1000)
    second = slot.start(cfg)
    step = next(e for e in second.events() if e is not None and e.kind == "step")
    assert step.max_steps == 500
    second.stop()
    result = second.wait(timeout=300)
    assert result.stopped and 1 <= result.final_step < 500 and slot.current is None
    pipe = load_pipeline(str(tiny_sd_path()))
    load_adapter(pipe, result.last_checkpoint)
    assert nblora_state_dict(pipe.unet)
    assert not is_initialized()


@pytest.mark.parametrize(
    "trainer, message",
    [
        (fail_after_a_step, "training failed: RuntimeError: boom"),
        (exit_without_a_word, "training failed: the training process exited with code 3 before it reported"),
        (get_killed, "training failed: the training process was killed by SIGKILL before it reported"),
    ],
    ids=["raises", "exits", "killed"],
)
def test_a_training_process_that_fails_or_dies_ends_the_run_with_one_line(tmp_path, trainer, message):
    slot = TrainingSlot(functools.partial(train_in_child_process, train_fn=trainer))
    run = slot.start(tiny_config(tmp_path / "out"))
    events = [e for e in run.events() if e is not None]
    assert [e.kind for e in events] == (["step", "error"] if trainer is fail_after_a_step else ["error"])
    assert events[-1].error.startswith(message) and "\n" not in events[-1].error
    with pytest.raises(ValueError, match=message):
        run.wait(timeout=60)
    assert slot.current is None


class _Unpicklable(Exception):
    def __init__(self, a, b):  # pickle rebuilds an exception from its args: (message,) is one too few
        super().__init__(f"{a} {b}\nmore")


def test_a_child_error_comes_back_as_itself_or_as_a_one_line_stand_in():
    def sent(e: BaseException) -> BaseException:  # what the parent raises for ``e`` raised in the child
        try:
            raise e
        except BaseException as caught:
            return child_process._rebuilt(*child_process._portable(caught))

    again = sent(TrainingError("loss is nan\nat step 3"))
    assert type(again) is TrainingError and str(again) == "loss is nan\nat step 3"
    assert "TrainingError: loss is nan" in str(again.__cause__)  # the child's traceback, as the cause
    stand_in, exited = sent(_Unpicklable("a", "b")), sent(SystemExit(2))
    assert isinstance(stand_in, TrainingProcessError) and isinstance(exited, TrainingProcessError)
    assert failure_message(stand_in) == "training failed: _Unpicklable: a b"
    assert failure_message(exited) == "training failed: SystemExit: 2"
    assert failure_message(again) == "loss is nan"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"files": DOG[:2]}, "at least 3"),
        ({"token": "my dog"}, "token must be one word"),
        ({"delta": -1}, "δ must be a finite number > 0"),
    ],
)
def test_bad_start_input_is_a_page_error_and_writes_nothing(tmp_path, handlers, overrides, match):
    h = handlers
    with pytest.raises(gr.Error, match=match):
        list(h.start_training(*_ui(**overrides).values()))
    leftovers = [p for p in (tmp_path / "app").rglob("*")] if (tmp_path / "app").exists() else []
    assert [p for p in leftovers if p.is_file()] == []


def test_start_streams_progress_and_validation_then_offers_the_adapter(tmp_path, handlers):
    h = handlers
    outputs = list(h.start_training(*_ui().values()))
    statuses = [s for s, _, _ in outputs]
    assert any(re.fullmatch(r"step 4/4 · loss \d+\.\d{4} · lr 0\.001 · 0:00 left.*", s) for s in statuses)
    assert any(re.search(r"step [1-3]/4 .* \d+:\d\d left", s) for s in statuses)
    gallery = outputs[-1][1]
    assert [c for _, c in gallery] == ["step 2", "step 2", "step 4", "step 4"]  # 2 images per validation
    assert all(isinstance(img, Image.Image) and img.size == (64, 64) for img, _ in gallery)
    assert statuses[-1].startswith("Finished 4 steps")
    update = outputs[-1][2]
    out_dir = Path(update["value"])
    assert out_dir.parent == h.adapters_dir and str(out_dir) in [v for _, v in update["choices"]]
    info = generation.read_adapter_info(out_dir)
    assert (info.delta, info.config["p"], info.token, info.base_model) == (1.5, 2, "sks", str(tiny_sd_path()))
    copies = sorted((h.root / "uploads" / out_dir.name).iterdir())
    assert [c.read_bytes() for c in copies] == [Path(p).read_bytes() for p in DOG]

    # the downloads: native zip that loads back, a diffusers LoRA for stock load_lora_weights, a kohya file
    native, diffusers_file, kohya = map(Path, h.downloads(str(out_dir)))
    assert (native.name, diffusers_file.name, kohya.name) == (
        f"{out_dir.name}-nblora.zip",
        "pytorch_lora_weights.safetensors",
        f"{out_dir.name}-kohya.safetensors",
    )
    unpacked = tmp_path / "unzipped"
    with zipfile.ZipFile(native) as z:
        assert sorted(Path(n).name for n in z.namelist()) == ["nblora_config.json", "nblora_unet.safetensors"]
        z.extractall(unpacked)
    with safe_open(str(kohya), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)

    items, _, _ = h.generate(str(out_dir), "a photo of sks dog", "", 3, False, 1, 2, 1.0, 1.5, False)
    ours = np.asarray(Image.open(items[0][0])).astype(np.float64)
    reloaded = load_pipeline(str(tiny_sd_path()))
    load_adapter(reloaded, unpacked / f"{out_dir.name}-nblora")
    again = np.asarray(generation.run_pipeline(reloaded, "a photo of sks dog", None, [3], 2, 1.0)[0])
    np.testing.assert_array_equal(again, ours)
    stock = load_pipeline(str(tiny_sd_path()))
    stock.load_lora_weights(str(diffusers_file.parent))
    via_lora = np.asarray(generation.run_pipeline(stock, "a photo of sks dog", None, [3], 2, 1.0)[0])
    assert np.abs(via_lora - ours).max() <= 2  # same update through stock diffusers, up to rounding


def test_stopped_training_resumes_to_the_adapter_of_an_uninterrupted_run(tmp_path, handlers):
    h = handlers
    user = SimpleNamespace(session_hash="a")
    stream = h.start_training(
        *_ui(steps=20, validation_steps=100, checkpointing_steps=100).values(), request=user
    )
    stopped = False
    for status, _, _ in stream:
        if status.startswith("step ") and not stopped:
            stopped = h.stop_training(user).startswith("Stopping")  # a checkpoint is written where it stops
    assert status.startswith("Stopped at step") and status.endswith("Resume it below.")
    update = h.resumable_choices()
    ((name, folder),) = update["choices"]
    assert update["value"] == folder and Path(folder).parent == h.adapters_dir

    outputs = [s for s, _, _ in h.resume_training(folder, request=user)]
    assert outputs[0] == f"Training resumed from the latest checkpoint (20 steps) → `{folder}`"
    assert outputs[-1].startswith("Finished 20 steps")
    assert h.resumable_choices()["choices"] == []
    with pytest.raises(gr.Error, match="already finished"):
        list(h.resume_training(folder))

    # exactly where it stopped: the same adapter as one uninterrupted run of the same config
    config = TrainConfig.from_dict(json.loads((Path(folder) / "train_config.json").read_text()))
    config = config.replace(output_dir=str(tmp_path / "straight"), resume_from_checkpoint=None)
    h.slot.start(config).wait(timeout=300)
    resumed, straight = (load_pipeline(str(tiny_sd_path())) for _ in range(2))
    load_adapter(resumed, folder)
    load_adapter(straight, tmp_path / "straight")
    a, b = nblora_state_dict(resumed.unet), nblora_state_dict(straight.unet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "folder, match",
    [
        (None, "choose a stopped training"),
        ("missing", "is not a training run"),
        ("corrupt", r"corrupt: train_config.json cannot be read \(Expecting"),
    ],
)
def test_resume_of_nothing_resumable_is_a_page_error(tmp_path, handlers, folder, match):
    if folder == "corrupt":
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train_config.json").write_text("{not json")
    with pytest.raises(gr.Error, match=match) as e:
        list(handlers.resume_training(str(tmp_path / folder) if folder else None))
    assert "\n" not in str(e.value)
