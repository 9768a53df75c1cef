"""Training-step cost of NB-LoRA vs PEFT LoRA on the SD1.5 UNet (random weights), same targets and rank.

One DreamBooth-style step: UNet forward on a noisy latent with text conditioning, MSE loss, backward,
AdamW step on the adapter. Both adapters wrap the 128 attention projections (to_q, to_k, to_v,
to_out.0) at rank 16; NB-LoRA with p = 2, δ = 1 (its pre-forward hook runs the batched Cayley
transforms), PEFT LoRA with lora_alpha = rank, trained in float32 as train_dreambooth.py does.

CPU: float32 at 256 px (32×32 latents). GPU: fp16 base weights, float32 adapters, fp16 autocast at
512 px. Time: the two adapters interleaved round by round, in alternating order (background load
and whichever runs first in a round hit both); the fastest step of all rounds counts. Memory: peak
allocated during one step above the level before it (CUDA: the allocator's peak; CPU: the running
sum of the profiler's allocation events), and the same plus every resident tensor (weights,
adapter, optimizer state) as the total.

    python benchmarks/train_step_bench.py [--resolution 256] [--rank 16] [--steps 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from nblora_diffusion import unload_nblora

from common import (
    SD15_UNET,
    TARGETS,
    add_adapter,
    add_device_option,
    device_of,
    machine,
    peak_bytes,
    synchronize,
)
from common import make_step as common_step


def remove_adapter(unet, kind: str) -> None:
    if kind == "nblora":
        unload_nblora(unet, merge=False)
    else:
        unet.unload_lora()


def make_step(unet, optimizer, resolution: int, device: torch.device):
    return common_step(unet, optimizer, resolution // 8, 768, device, unet.dtype)


def time_steps(step, n: int, device: torch.device) -> float:
    """Fastest of ``n`` steps: on a shared machine, slower runs measure the neighbours, not the step."""
    times = []
    for _ in range(n):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def step_peak_bytes(step, optimizer, device: torch.device) -> int:
    """Peak allocated bytes during one step, above the level at its start (gradients already freed, so
    that the CPU profiler sees every deallocation of the step)."""
    optimizer.zero_grad(set_to_none=True)
    return peak_bytes(step, device)


def resident_bytes(unet, optimizer) -> int:
    tensors = list(unet.parameters()) + list(unet.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_option(parser)
    parser.add_argument("--resolution", type=int, default=None, help="px (default: 256 on CPU, 512 on GPU)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (even: both orders)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    device = device_of(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolution = args.resolution or (512 if device.type == "cuda" else 256)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"machine: {machine(device)}")
    print(
        f"SD1.5 UNet (random weights), {resolution} px, batch 1, {dtype}, rank {args.rank}, targets {TARGETS}"
    )
    torch.manual_seed(0)
    unet = torch.nn.Module.to(UNet2DConditionModel(**SD15_UNET), device, dtype)  # diffusers `to` warns
    unet.requires_grad_(False)
    unet.train()
    best = {"nblora": math.inf, "lora": math.inf}
    memory: dict[str, tuple[int, int]] = {}
    for r in range(args.rounds):
        # the order alternates: the adapter that runs first in a round was measured slower on CPU
        for kind in list(best) if r % 2 == 0 else list(reversed(best)):
            optimizer = add_adapter(unet, kind, args.rank)
            step = make_step(unet, optimizer, resolution, device)
            step()  # warm-up: allocates AdamW state and the cuDNN/oneDNN plans
            best[kind] = min(best[kind], time_steps(step, args.steps, device))
            if r == 0:
                peak = step_peak_bytes(step, optimizer, device)
                memory[kind] = (peak, resident_bytes(unet, optimizer) + peak)
            print(f"  round {r + 1} {kind:6s}: {best[kind] * 1e3:9.1f} ms/step (best so far)", flush=True)
            del optimizer, step
            remove_adapter(unet, kind)
    gib = 2.0**30
    print(f"\n{'adapter':8s} {'ms/step':>10s} {'step peak GiB':>14s} {'total GiB':>10s}")
    for kind in best:
        print(
            f"{kind:8s} {best[kind] * 1e3:10.1f} {memory[kind][0] / gib:14.3f} {memory[kind][1] / gib:10.3f}"
        )
    time_ratio = best["nblora"] / best["lora"]
    total_ratio, peak_ratio = (memory["nblora"][i] / memory["lora"][i] for i in (1, 0))
    print(f"\nNB-LoRA / LoRA time ratio:                {time_ratio:.3f}  (target <= 1.03)")
    print(f"NB-LoRA / LoRA peak memory ratio (total): {total_ratio:.3f}  (target <= 1.01)")
    print(f"NB-LoRA / LoRA step-peak memory ratio:    {peak_ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
