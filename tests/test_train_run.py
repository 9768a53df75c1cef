"""End-to-end DreamBooth runs on the tiny random-weight SD model (CPU): outputs, bound, export, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_config

from nblora_diffusion import diffusion
from nblora_diffusion.core import nblora_layers
from nblora_diffusion.core.bounds import matrix_schatten_norm
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.training import TrainCallbacks, TrainConfig, train
from nblora_diffusion.training import loop as train_loop

STEPS = 6


def full_config(out: Path, **changes) -> TrainConfig:
    """Every output on: accumulation across an epoch boundary, flips, validation, kohya, TensorBoard."""
    defaults = dict(
        class_prompt="a photo of dog",
        random_flip=True,
        train_batch_size=1,
        gradient_accumulation_steps=2,  # 5 photos -> 3 updates per epoch: the run crosses an epoch boundary
        max_train_steps=STEPS,
        learning_rate=5e-2,  # large, so that the updates press against the bound
        norm_p="2",
        norm_bound=0.05,
        checkpointing_steps=2,
        validation_prompt="a photo of sks dog on the beach",
        validation_steps=3,
        num_validation_images=2,
        validation_inference_steps=2,
        export_kohya=True,
        report_to="tensorboard",
    )
    return tiny_config(out, **{**defaults, **changes})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    events = {"step": [], "validation": [], "checkpoint": []}
    callbacks = TrainCallbacks(
        on_step=lambda *a: events["step"].append(a),
        on_validation=lambda step, images: events["validation"].append((step, images)),
        on_checkpoint=lambda step, path: events["checkpoint"].append((step, Path(path))),
    )
    result = train(full_config(out), callbacks=callbacks)
    return out, result, events


def _final_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "nblora_unet.safetensors"))


def test_six_step_run_writes_every_output(full_run):
    out, result, events = full_run
    assert result.final_step == STEPS and not result.stopped
    assert result.last_checkpoint == out / f"checkpoint-{STEPS}"
    for name in (
        "nblora_config.json",
        "nblora_unet.safetensors",
        "pytorch_lora_weights.safetensors",
        "kohya_lora.safetensors",
        "train_config.json",
        "train_log.csv",
        "norms.csv",
        "norm_curves.png",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    with (out / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(float(r["loss"])) and float(r["lr"]) == 5e-2 for r in rows)
    info = json.loads((out / "nblora_config.json").read_text())
    assert info["token"] == "sks" and info["p"] == 2.0 and info["delta"] == 0.05
    assert TrainConfig.from_dict(json.loads((out / "train_config.json").read_text())) == full_config(out)
    # callbacks: every step, each validation grid, each checkpoint
    assert [e[0] for e in events["step"]] == list(range(1, STEPS + 1))
    assert all(e[1] == STEPS for e in events["step"])
    assert [s for s, _ in events["validation"]] == [3, 6] and len(events["validation"][0][1]) == 2
    assert [s for s, _ in events["checkpoint"]] == [2, 4, 6]


def test_bound_holds_in_every_saved_checkpoint(full_run):
    out, _, _ = full_run
    pipe = diffusion.load_pipeline(tiny_sd_path())
    worst = 0.0
    for step in (2, 4, 6):
        folder = out / f"checkpoint-{step}"
        for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "training_state.safetensors"):
            assert (folder / name).is_file(), f"{folder.name}/{name}"
        diffusion.load_adapter(pipe, folder)  # the adapter alone is loadable, as eval needs
        for _, layer in nblora_layers(pipe.unet):
            with torch.no_grad():
                norm = float(matrix_schatten_norm(layer.delta_weight().double(), layer.p))
            assert norm <= layer.delta * (1 + 1e-6), (step, norm, layer.delta)
            worst = max(worst, norm / layer.delta)
    assert worst > 0.5, f"updates stayed far from the bound ({worst:.3f}): the check would be vacuous"
    with (out / "norms.csv").open() as f:
        ratios = [float(r["ratio"]) for r in csv.DictReader(f)]
    assert len(ratios) == STEPS * len(list(nblora_layers(pipe.unet)))
    assert max(ratios) <= 1 + 1e-6


def test_load_lora_weights_of_export_reproduces_our_images(full_run):
    out, _, _ = full_run
    ours = diffusion.load_pipeline(tiny_sd_path())
    diffusion.load_adapter(ours, out)
    stock = diffusion.load_pipeline(tiny_sd_path())
    stock.load_lora_weights(out)  # plain diffusers + PEFT: no NB-LoRA code involved
    base = diffusion.load_pipeline(tiny_sd_path())

    def images(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a photo of sks dog", num_inference_steps=2, height=32, width=32, generator=g, output_type="np"
        ).images

    a, b, c = images(ours), images(stock), images(base)
    assert np.abs(a - b).max() < 1e-4
    assert np.abs(a - c).max() > 1e-3, "the adapter has no visible effect: the comparison would be vacuous"


def test_kill_during_checkpoint_then_resume_matches_uninterrupted(full_run, tmp_path, monkeypatch):
    out_full, _, _ = full_run
    out = tmp_path / "out"
    real_write = train_loop.write_adapter

    def crash_at_last_checkpoint(pipe, setup, folder, config, step, final):
        if step == STEPS and not final:
            raise KeyboardInterrupt("killed while writing a checkpoint")
        return real_write(pipe, setup, folder, config, step, final)

    monkeypatch.setattr(train_loop, "write_adapter", crash_at_last_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(full_config(out))
    # the interrupted checkpoint left nothing behind; the earlier ones are intact
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "nblora_config.json").exists()
    monkeypatch.setattr(train_loop, "write_adapter", real_write)

    result = train(full_config(out, resume_from_checkpoint="latest"))
    assert result.final_step == STEPS
    full, resumed = _final_tensors(out_full), _final_tensors(out)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key  # bitwise
    with (out_full / "train_log.csv").open() as f, (out / "train_log.csv").open() as g:
        assert [r["loss"] for r in csv.DictReader(f)] == [r["loss"] for r in csv.DictReader(g)]


def test_should_stop_saves_checkpoint_and_adapter(tmp_path):
    """Stop mid-run (parameterization I, Min-SNR, cosine schedule with warm-up, checkpoint limit 1)."""
    steps = []
    config = full_config(
        tmp_path / "out",
        max_train_steps=50,
        checkpointing_steps=1,
        checkpoints_total_limit=1,
        validation_prompt=None,
        export_kohya=False,
        report_to="none",
        gradient_accumulation_steps=1,
        parameterization="I",
        norm_p="inf",
        norm_bound=None,
        norm_bound_ratio=0.2,
        snr_gamma=5.0,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
    )
    callbacks = TrainCallbacks(on_step=lambda step, max_steps, loss, lr, elapsed: steps.append((step, lr)))
    result = train(config, callbacks, should_stop=lambda: len(steps) >= 3)
    assert result.stopped and result.final_step == 3
    assert steps[0][1] < steps[1][1]  # warm-up
    out = tmp_path / "out"
    assert result.last_checkpoint == out / "checkpoint-3"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # the limit pruned 1 and 2
    assert (result.last_checkpoint / "training_state.safetensors").is_file()
    info = diffusion.read_adapter_config(out)
    assert info["parameterization"] == "I" and info["gamma"] == 0.2
