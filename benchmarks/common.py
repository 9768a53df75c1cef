"""What the benchmarks share: the SD1.5 UNet config, an adapter on a UNet with its optimizer, one training
step, the --device option, the machine line, device sync and peak memory."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from nblora_diffusion import NBLoRAConfig, inject_nblora
from nblora_diffusion.devices import resolve_device
from nblora_diffusion.training.optim import make_optimizer

# stable-diffusion-v1-5 unet/config.json, the fields that fix the architecture
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the 128 attention projections
ADAMW = dict(lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)  # torch's defaults but lr


def add_adapter(unet, kind: str, rank: int, optimizer: str = "adamw") -> torch.optim.Optimizer:
    """NB-LoRA (p = 2, δ = 1) or PEFT LoRA (alpha = r) on ``TARGETS``, float32 adapters; their AdamW
    (torch's defaults, lr 1e-4; ``optimizer``: the trainer's ``adamw`` or ``adamw_fused``)."""
    torch.manual_seed(0)
    if kind == "nblora":
        inject_nblora(unet, NBLoRAConfig(rank=rank, p=2.0, delta=1.0, target_modules=TARGETS))
    else:
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS)
        )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # adapters train in float32 over fp16 base weights
        p.data = p.data.float()
    return make_optimizer(optimizer, params, **ADAMW)


def make_step(model, optimizer, side: int, context_dim: int, device: torch.device, dtype: torch.dtype):
    """One optimizer step of a noise-prediction MSE on fixed random (1, 4, side, side) latents."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, side, side, generator=g).to(device, dtype)
    target = torch.randn(1, 4, side, side, generator=g).to(device)
    context = torch.randn(1, 77, context_dim, generator=g).to(device, dtype)
    timestep = torch.tensor([500], device=device)
    autocast = device.type == "cuda" and dtype == torch.float16

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
            pred = model(latents, timestep, context).sample
        F.mse_loss(pred.float(), target).backward()
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak allocated bytes while ``fn`` runs, above the level at its start (CUDA: the allocator's
    peak; CPU: the running sum of the profiler's allocation events)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")


def device_of(name: str | None) -> torch.device:
    """The --device to run on; one line on stderr and exit status 2 for a device this machine lacks."""
    try:
        return resolve_device(name)
    except ValueError as e:
        print(f"error: --device: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def machine(device: torch.device) -> str:
    """One line naming the device, for the results tables."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
