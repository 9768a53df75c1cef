"""--estimate_memory: the trainer's step on fake tensors counts what the same step allocates on real tensors
(within 1%, phase by phase) and never underestimates the real CPU peak that torch's profiler sees (by more
than 10%; a CPU whose kernels need less scratch may sit below it), the CUDA emulation casts and fuses as
CUDA does, the memory savers lower the estimate, and the CLI prints it without training."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nblora_diffusion.diffusion import single_file as sf
from nblora_diffusion.testing import tiny_sd_path
from nblora_diffusion.testing.ldm_layout import save_ldm_checkpoint
from nblora_diffusion.training import TrainConfig, memory, stand_ins

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_dreambooth", ROOT / "train_dreambooth.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def config(sdxl: bool = False, **changes) -> TrainConfig:
    values = dict(
        pretrained_model_name_or_path=str(tiny_sd_path(sdxl=sdxl)),
        resolution=32,
        norm_bound=0.5,
        rank=4,
        train_batch_size=2,
    )
    return TrainConfig(**{**values, **changes})


@pytest.mark.parametrize(
    "sdxl, changes",
    [
        (False, {}),
        # gradient checkpointing keeps few activations: 64 px, so that they still matter next to the weights
        (
            False,
            {"adapter": "lora", "gradient_checkpointing": True, "mixed_precision": "bf16", "resolution": 64},
        ),
        (True, {"with_prior_preservation": True, "class_data_dir": "x", "class_prompt": "a photo of dog"}),
        (False, {"train_text_encoder": True, "snr_gamma": 5.0, "noise_offset": 0.1}),
    ],
    ids=["sd-nblora", "sd-lora-ckpt-bf16", "sdxl-prior", "sd-text-encoder"],
)
def test_fake_estimate_counts_the_real_step_and_covers_the_cpu_peak(one_thread, sdxl, changes):
    cfg = config(sdxl, **changes)
    estimate = memory.estimate_memory(cfg, device="cpu")
    counted, profiled = memory.measure_cpu_memory(cfg)
    assert estimate.peak == pytest.approx(counted.peak, rel=0.01)
    # the profiler sees the kernels' own scratch too, which depends on the CPU (seen: 0.75-1.0x the estimate)
    assert 0.5 * estimate.peak <= profiled <= 1.10 * estimate.peak, (estimate.peak, profiled)
    assert estimate.phases.keys() == counted.phases.keys()
    for phase, peak in estimate.phases.items():  # fake and real tensors: the same counts, phase by phase
        assert peak == pytest.approx(counted.phases[phase], rel=0.01), phase
    resident = sum(estimate.weights.values()) + estimate.trainable
    assert estimate.peak > 1.2 * resident, "activations must be a sizeable part: the check would be vacuous"


def test_live_bytes_counts_each_storage_once_and_frees_it():
    tracker = memory.LiveBytes()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a[:10]
        b = a * 2
        assert tracker.live == 8000
        del a, b
        assert tracker.live == 4000, "the view keeps a's storage alive"
        del view
    assert tracker.live == 0 and tracker.peak == 8000
    rounded = memory.LiveBytes(round_to=memory.CUDA_BLOCK)
    with rounded:
        c = torch.empty(3)
        assert rounded.live == 512
    del c


def test_cuda_policy_runs_norms_softmax_and_upsampling_in_float32_then_goes_away():
    x = torch.randn(2, 8, 4, 4, dtype=torch.float16)
    with memory.cuda_autocast_policy(), torch.autocast("cpu", dtype=torch.float16):
        assert F.group_norm(x, 2).dtype == torch.float32
        assert F.layer_norm(x, (4,)).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32
        assert F.interpolate(x, scale_factor=2.0, mode="nearest").dtype == torch.float32
        assert F.linear(x.float(), torch.randn(3, 4)).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.float16):  # CPU autocast's own policy again
        assert F.group_norm(x, 2).dtype == torch.float16


def test_cuda_attention_never_holds_the_n_by_n_matrix():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def peak(kernels) -> int:
        with FakeTensorMode(), kernels:
            q = torch.empty(1, 8, 4096, 64, dtype=torch.float16, requires_grad=True)  # SD1.5 at 512 px
            tracker = memory.LiveBytes()
            with tracker:
                F.scaled_dot_product_attention(q, q, q).float().sum().backward()
            return tracker.peak

    fused, math = (
        peak(memory.cuda_kernels()),
        peak(torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)),
    )
    n_by_n = 8 * 4096 * 4096 * 2
    assert fused < n_by_n < math


def test_memory_savers_lower_the_estimate():
    plain = memory.estimate_memory(config(resolution=64))
    assert plain.weights.keys() == {"unet", "vae", "text_encoder"}
    cached = memory.estimate_memory(config(resolution=64, cache_latents=True, cache_text_embeddings=True))
    assert cached.weights.keys() == {"unet"}, "the VAE and the text encoder leave the GPU"
    assert cached.phases["training step 2"] < plain.phases["training step 2"]
    checkpointed = memory.estimate_memory(config(resolution=64, gradient_checkpointing=True))
    assert checkpointed.phases["training step 2"] < plain.phases["training step 2"]
    half = memory.estimate_memory(config(resolution=64, mixed_precision="fp16"))
    assert half.weights["unet"] == pytest.approx(plain.weights["unet"] / 2, rel=0.02)
    big = torch.empty(8192)  # 8-bit states: 1 byte per element and a float32 absmax per 256
    assert sum(t.nbytes for t in stand_ins.adamw8bit_state(big).values()) == 2 * 8192 + 2 * 4 * 32
    small = torch.empty(100)  # under bitsandbytes' min_8bit_size: float32 states
    assert sum(t.nbytes for t in stand_ins.adamw8bit_state(small).values()) == 2 * 4 * 100
    assert sum(t.nbytes for t in stand_ins.prodigy_state(big).values()) == 4 * 4 * 8192


def test_models_come_from_shipped_configs_known_hub_ids_and_single_files(tmp_path):
    assert memory.model_folder(TrainConfig()) == sf.CONFIGS / "sd15"  # the default hub id, no hub needed
    cfg = TrainConfig(
        pretrained_model_name_or_path="someone/model", base_model_config="sdxl-base", estimate_memory=True
    )
    assert memory.model_folder(cfg) == sf.CONFIGS / "sdxl-base"
    file = save_ldm_checkpoint(tiny_sd_path(sdxl=True), tmp_path / "x.safetensors")
    assert (
        memory.model_folder(TrainConfig(pretrained_model_name_or_path=str(file))) == sf.CONFIGS / "sdxl-base"
    )
    with pytest.raises(ValueError, match="--base_model_config sd15") as e:
        memory.model_folder(TrainConfig(pretrained_model_name_or_path="someone/model"))
    assert "\n" not in str(e.value)


def test_cli_prints_the_estimate_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd_path()), "--output_dir", str(out),
            "--resolution", "32", "--estimate_memory", "--gradient_checkpointing",
            "--cache_latents"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "expected peak cuda memory" in text and "training step 2" in text and "latent caching" in text
    assert not out.exists()
