"""The process-wide state a run touches: torch's TF32 flag is as it was after train() returns or raises, and
accelerate's precision, fixed once per process, makes a run with another --mixed_precision a one-line error
(the app's default runs each training in a process of its own: tests/test_app_training.py)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_config

from nblora_diffusion.training import TrainCallbacks, train
from nblora_diffusion.training.config import ADAPTERS
from nblora_diffusion.training.methods import METHODS, AdapterSetup
from nblora_diffusion.training.setup import check_process_precision, tf32_matmuls


@pytest.fixture
def tf32_flag():
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("flag", [False, True])
def test_tf32_matmuls_sets_the_flag_inside_and_restores_it_on_error(tf32_flag, monkeypatch, flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the flag itself needs no GPU
    torch.backends.cuda.matmul.allow_tf32 = flag
    with pytest.raises(RuntimeError, match="boom"), tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32 is True
        raise RuntimeError("boom")
    assert torch.backends.cuda.matmul.allow_tf32 is flag
    with tf32_matmuls(False):
        assert torch.backends.cuda.matmul.allow_tf32 is flag


class _Flip(Exception):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["returns", "raises"])
def test_train_leaves_the_global_tf32_flag_as_it_was(tmp_path, tf32_flag, ending):
    """Whatever the run does to the flag (here a callback flips it), it is back once train() ends."""
    before = torch.backends.cuda.matmul.allow_tf32 = False

    def on_step(*_):
        torch.backends.cuda.matmul.allow_tf32 = True
        if ending == "raises":
            raise _Flip

    cfg = tiny_config(tmp_path / "out", max_train_steps=1, checkpointing_steps=10, allow_tf32=True, rank=2)
    if ending == "raises":
        with pytest.raises(_Flip):
            train(cfg, TrainCallbacks(on_step=on_step))
    else:
        assert train(cfg, TrainCallbacks(on_step=on_step)).final_step == 1
    assert torch.backends.cuda.matmul.allow_tf32 is before


def test_another_precision_in_the_same_process_is_a_one_line_error_before_anything_is_written(tmp_path):
    """accelerate fixes the precision once per process and has no public reset: train() says what to do
    (a new process; the app runs each training in its own) instead of resetting accelerate's private state."""
    from accelerate import Accelerator

    Accelerator(mixed_precision="no")  # what a first train() with --mixed_precision no leaves behind
    out = tmp_path / "bf16"
    expected = "^--mixed_precision bf16: this process already trained with 'no'"
    with pytest.raises(ValueError, match=expected) as e:
        train(tiny_config(out, mixed_precision="bf16", max_train_steps=1))
    assert "start a new process" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
    check_process_precision("no")  # the same precision again: fine


def test_every_adapter_option_has_one_method():
    assert set(METHODS) == set(ADAPTERS)
    for kind, method in METHODS.items():
        assert issubclass(method, AdapterSetup) and method.kind == kind
