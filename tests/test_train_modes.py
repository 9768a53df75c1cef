"""Training modes on tiny models: PEFT baselines, Bernoulli-LoRA, prior preservation + text encoders (SDXL),
non-finite loss and out-of-memory handling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_config

from nblora_diffusion import diffusion
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.training import TrainConfig, TrainingError, train
from nblora_diffusion.training import loop as train_loop
from nblora_diffusion.training.config import ADAPTERS
from nblora_diffusion.training.methods import add_adapters
from nblora_diffusion.training.sampling import ensure_class_images


def config(out: Path, **changes) -> TrainConfig:
    defaults = dict(
        max_train_steps=2,
        checkpointing_steps=1,
        learning_rate=1e-2,
    )
    return tiny_config(out, **{**defaults, **changes})


def _unet_out(pipe, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 4, 4, generator=g)
    ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), ctx).sample


@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if a != "nblora"])
def test_each_baseline_trains_and_its_export_loads_in_stock_diffusers(tmp_path, adapter):
    """A PEFT baseline trains on the same targets; its pytorch_lora_weights, loaded by plain diffusers,
    reproduce the trained UNet (PiSSA's residual base folded into a rank-2r LoRA of the original weights)."""
    cfg = config(tmp_path / adapter, adapter=adapter, export_kohya=True, checkpointing_steps=2)
    result = train(cfg)
    out = result.output_dir
    assert result.final_step == 2 and not (out / "nblora_config.json").exists()
    for folder in (out, out / "checkpoint-2"):
        assert (folder / "pytorch_lora_weights.safetensors").is_file()
    kohya = load_file(str(out / "kohya_lora.safetensors"))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    # rebuild the trained UNet: same (deterministic) init, then the checkpoint's exact tensors
    trained = diffusion.load_pipeline(tiny_sd_path())
    setup = add_adapters(trained, cfg)
    init = {k: v.clone() for k, v in setup.state().items()}
    setup.load_state(load_file(str(out / "checkpoint-2" / "training_state.safetensors")))
    assert any(not torch.equal(init[k], v) for k, v in setup.state().items() if "lora_B" in k), (
        "nothing trained"
    )
    stock = diffusion.load_pipeline(tiny_sd_path())
    base = _unet_out(stock)
    stock.load_lora_weights(out)
    assert (_unet_out(trained) - base).abs().max() > 1e-4, (
        "the adapter has no effect: the check would be vacuous"
    )
    assert torch.allclose(_unet_out(stock), _unet_out(trained), atol=1e-5)
    with open(out / "norms.csv") as f:
        assert len(f.readlines()) > 1


def test_bernoulli_mode_changes_only_one_factor_per_step(tmp_path, monkeypatch):
    snapshots = []  # (Ã, B̃) of every layer just before each optimizer step
    real = train_loop.bernoulli_select

    def record(setup, q, *args):
        state = setup.state()
        snapshots.append({k: v.clone() for k, v in state.items() if k.endswith(("nblora_A", "nblora_B"))})
        real(setup, q, *args)

    monkeypatch.setattr(train_loop, "bernoulli_select", record)
    steps = 5
    # weight decay moves a chosen Ã even while B̃ = 0 (when its gradient is exactly zero)
    train(config(tmp_path / "out", bernoulli_p=0.5, max_train_steps=steps, checkpointing_steps=100))
    assert len(snapshots) == steps

    def moved(a, b, factor):
        return any(not torch.equal(a[k], b[k]) for k in a if k.endswith(factor))

    picks = []
    for before, after in zip(snapshots, snapshots[1:], strict=False):
        a, b = moved(before, after, "nblora_A"), moved(before, after, "nblora_B")
        assert a != b, "exactly one factor must change per step"
        picks.append("A" if a else "B")
    assert set(picks) == {"A", "B"}, f"q = 0.5 over {steps - 1} steps should pick both factors: {picks}"


def test_bernoulli_draw_depends_on_seed_and_step_only():
    """What keeps data-parallel replicas identical: every process draws the same group, whatever its RNG."""

    def draw(seed, step, global_seed):
        torch.manual_seed(global_seed)
        grads = []

        class Setup:
            def factor_groups(self):
                params = [torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)]
                for p in params:
                    p.grad = torch.ones(1)
                grads.append(params)
                return [params[0]], [params[1]]

        train_loop.bernoulli_select(Setup(), 0.5, seed, step)
        return tuple(p.grad is not None for p in grads[0])

    picks = [draw(7, step, 0) for step in range(16)]
    assert picks == [draw(7, step, 1234) for step in range(16)]  # another global RNG state, same picks
    assert set(picks) == {(True, False), (False, True)}


def test_prior_preservation_and_text_encoders_train_on_sdxl(tmp_path):
    class_dir = tmp_path / "class"
    cfg = config(
        tmp_path / "out",
        pretrained_model_name_or_path=str(tiny_sd_path(sdxl=True)),
        with_prior_preservation=True,
        class_data_dir=str(class_dir),
        class_prompt="a photo of dog",
        num_class_images=2,
        class_inference_steps=2,
        sample_batch_size=2,
        train_text_encoder=True,
        text_encoder_rank=2,
        gradient_checkpointing=True,
        checkpointing_steps=10,
    )
    result = train(cfg)
    assert len(list(class_dir.glob("*.png"))) == 2  # generated with the base model
    info = diffusion.read_adapter_config(result.output_dir)
    assert set(info["components"]) == {"unet", "text_encoder", "text_encoder_2"}
    for name in ("text_encoder", "text_encoder_2"):
        tensors = load_file(str(result.output_dir / f"nblora_{name}.safetensors"))
        b = [v for k, v in tensors.items() if k.endswith("nblora_B")]
        assert b and all(v.shape[0] == 2 for v in b)  # text_encoder_rank
        assert any(v.abs().max() > 0 for v in b), f"{name} adapters did not train (B̃ still 0)"
    # the next run finds the class images and generates none
    assert (
        ensure_class_images(
            None,
            class_dir,
            prompt="a photo of dog",
            num=2,
            steps=2,
            resolution=32,
            seed=0,
            batch_size=2,
            sdxl=True,
        )
        == 0
    )


def test_non_finite_loss_stops_naming_step_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    # an unbounded LoRA with a huge step size diverges at once (NB-LoRA cannot: its update is bounded)
    with pytest.raises(TrainingError, match=r"at step (\d+).*checkpoint-") as info:
        train(config(out, adapter="lora", learning_rate=1e30, max_train_steps=20))
    step = int(info.value.args[0].split("at step ")[1].split(":")[0])
    assert step >= 2 and len(str(info.value).splitlines()) == 1
    assert (out / f"checkpoint-{step - 1}" / "training_state.safetensors").is_file()
    assert not (out / f"checkpoint-{step}").exists()
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_out_of_memory_names_the_flags_that_reduce_memory(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_loop, "dreambooth_loss", oom)
    with pytest.raises(TrainingError) as info:
        train(config(tmp_path / "out"))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "out of memory at step 1" in message
    for flag in (
        "--gradient_checkpointing",
        "--mixed_precision fp16",
        "--train_batch_size 1",
        "--optimizer adamw8bit",
        "--cache_latents",
        "--cache_text_embeddings",
        "--estimate_memory",
        "--resolution",
        "--rank",
    ):
        assert flag in message


def test_bf16_mixed_precision_keeps_adapter_weights_in_float32(tmp_path):
    result = train(config(tmp_path / "bf16", mixed_precision="bf16", max_train_steps=1))
    tensors = load_file(str(result.output_dir / "nblora_unet.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    # accelerate fixes the precision once per process: another one is a one-line error, nothing written
    # (the app runs each training in its own process: tests/test_app_training.py)
    with pytest.raises(ValueError, match="this process already trained with 'bf16'") as e:
        train(config(tmp_path / "fp32", max_train_steps=1))
    assert "\n" not in str(e.value) and not (tmp_path / "fp32").exists()


def test_v_prediction_models_train_with_min_snr_weighting(tmp_path):
    """SD2.x-style schedulers predict v: the target is the velocity, Min-SNR divides by SNR + 1."""
    model = tmp_path / "tiny-v"
    shutil.copytree(tiny_sd_path(), model)
    scheduler = model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    result = train(config(tmp_path / "out", pretrained_model_name_or_path=str(model), snr_gamma=5.0))
    assert result.final_step == 2
    with open(result.output_dir / "train_log.csv") as f:
        assert len(f.readlines()) == 3
