"""--compile: the option, its one-line errors, and a compiled DreamBooth run equal to the eager one."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend
from train_helpers import tiny_config

from nblora_diffusion.training import TrainConfig, build_parser, train
from nblora_diffusion.training import setup as train_setup


def config(out: Path, **changes) -> TrainConfig:
    defaults = dict(
        max_train_steps=3,
        gradient_accumulation_steps=2,
        checkpointing_steps=100,
        learning_rate=1e-2,
        lr_scheduler="linear",  # a learning rate that changes every step
        norm_p="2",
    )
    return tiny_config(out, **{**defaults, **changes})


def test_compile_is_an_option_of_the_command_line():
    assert build_parser().parse_args(["--compile"]).compile is True
    assert TrainConfig().compile is False


def test_torch_that_cannot_compile_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(ValueError, match=r"^--compile needs torch.compile, which torch .* drop --compile$"):
        train_setup.check_compile("cpu")


def test_cpu_without_a_cxx_compiler_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(train_setup.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"^--compile on the CPU needs a C\+\+ compiler"):
        train_setup.check_compile("cpu")


@pytest.mark.slow
def test_compiled_run_trains_the_same_adapter_as_the_eager_run(tmp_path, monkeypatch):
    train(config(tmp_path / "eager"))
    # the real wiring, with Dynamo + AOT autograd in place of inductor's code generation (minutes on a
    # CPU) and fullgraph=True, so that a graph break fails the run
    counter = CompileCounterWithBackend("aot_eager")
    calls = []

    def compile_(model, **kwargs):
        calls.append(type(model).__name__)
        return real_compile(model, backend=counter, fullgraph=True)

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.wraps(real_compile)(compile_))
    train(config(tmp_path / "compiled", compile=True))
    assert calls == ["UNet2DConditionModel"]
    assert counter.frame_count == 1  # no recompilation across steps, accumulation and schedule changes
    eager = load_file(str(tmp_path / "eager" / "nblora_unet.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "nblora_unet.safetensors"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], rtol=1e-4, atol=1e-5), key
