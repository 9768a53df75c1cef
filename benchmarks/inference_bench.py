"""Inference speed of NB-LoRA on the SD1.5 architecture (random weights): images/s ratios in one run.

Variants, timed round-robin on one pipeline so that machine noise hits all of them alike:
  base      the plain pipeline
  unmerged  NB-LoRA on the UNet attention projections, factors materialised once (cached)
  merged    the same adapter merged into the weights
  peft      the same update as a plain LoRA (our diffusers export) loaded by diffusers' load_lora_weights

    python benchmarks/inference_bench.py                      # CPU: 256 px, fp32
    python benchmarks/inference_bench.py --device cuda        # (default with CUDA) 512 px, fp16

Prints the FLOPs of one UNet step per variant (exact, free of timing noise), then for one UNet step and
for a whole generation the median and minimum time of each variant and its speed relative to base
(images/s ratio: 1.00x = no overhead, 0.97x = 3 % slower).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from nblora_diffusion.core import load_nblora_state_dict, nblora_layers, nblora_state_dict
from nblora_diffusion.diffusion import (
    add_nblora,
    export_diffusers_lora,
    make_config,
    merge_adapter,
    remove_adapter,
)

from common import SD15_UNET, add_device_option, device_of

SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
)  # fmt: skip
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408)  # fmt: skip


def sd15_pipeline(device: torch.device, dtype: torch.dtype):
    """SD1.5's UNet, VAE and CLIP-L text encoder at full size with random weights (no download)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nblora_diffusion.testing.tiny_sd import _scheduler, _tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=_tokenizer(),  # a small BPE vocabulary: token ids stay inside CLIP-L's 49408
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=_scheduler(),  # SD's DDIM settings
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def generate(pipe, size: int, steps: int) -> float:
    gen = torch.Generator(device="cpu").manual_seed(0)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(
        "a photo of sks dog",
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=gen,
        output_type="pt",
    )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def report(title: str, unit: str, times: dict[str, list[float]]) -> None:
    """Median and min (the least-disturbed run on a shared machine) per variant, as ratios to base."""
    print(f"\n{title}: {len(times['base'])} timings per variant")
    print(f"{'variant':<10} {'median ' + unit:>15} {'min ' + unit:>12} {'speed vs base (median)':>23} "
          f"{'(min)':>7}")  # fmt: skip
    base_med, base_min = statistics.median(times["base"]), min(times["base"])
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        print(f"{name:<10} {med:>15.3f} {low:>12.3f} {base_med / med:>22.3f}x {base_min / low:>6.3f}x")


def unet_step(pipe, size: int) -> float:
    """One classifier-free-guidance UNet forward (batch 2), the unit the adapters add cost to."""
    dev, dtype = pipe.unet.device, pipe.unet.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(2, 4, size // 8, size // 8, generator=gen).to(dev, dtype)
    text = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=gen).to(dev, dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        pipe.unet(latents, 500, encoder_hidden_states=text)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_option(parser)
    parser.add_argument("--size", type=int, default=None, help="image side (default 256 on CPU, 512 on CUDA)")
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default fp32 CPU, fp16 CUDA"
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 2 CPU, 25 CUDA)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds per variant (default 3 CPU, 10 CUDA)"
    )
    parser.add_argument("--unet-reps", type=int, default=None, help="UNet steps timed per variant per round")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    device = device_of(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (512 if cuda else 256)
    steps = args.steps or (25 if cuda else 2)
    rounds = args.rounds or (10 if cuda else 3)
    unet_reps = args.unet_reps or (10 if cuda else 2)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if cuda else "fp32")
    ]

    pipe = sd15_pipeline(device, dtype)
    config = make_config(args.rank, "inf", delta=1.0, preset="attn")
    n_layers = len(add_nblora(pipe, config)["unet"])
    with torch.no_grad():  # a 'trained' adapter: non-zero update
        for _, layer in nblora_layers(pipe.unet):
            layer.nblora_B.normal_(std=0.1)
    adapter = {k: v.clone() for k, v in nblora_state_dict(pipe.unet).items()}
    lora_dir = tempfile.TemporaryDirectory(prefix="nblora_bench_")
    export_diffusers_lora(pipe, lora_dir.name)
    remove_adapter(pipe)

    def to_base() -> None:
        if list(nblora_layers(pipe.unet)):
            remove_adapter(pipe)
        if getattr(pipe.unet, "peft_config", None):
            pipe.unload_lora_weights()

    def to_unmerged() -> None:
        to_base()
        add_nblora(pipe, config)
        load_nblora_state_dict(pipe.unet, adapter)
        with torch.no_grad():  # what the first forward does (in batches): the factors, then cached
            for _, layer in nblora_layers(pipe.unet):
                layer.factors()

    def to_merged() -> None:
        to_unmerged()
        merge_adapter(pipe)

    def to_peft() -> None:
        to_base()
        pipe.load_lora_weights(lora_dir.name, adapter_name="bench")

    variants = {"base": to_base, "unmerged": to_unmerged, "merged": to_merged, "peft": to_peft}
    print(f"SD1.5 architecture, random weights | {device} {str(dtype).removeprefix('torch.')} | "
          f"{size}px, {steps} steps | NB-LoRA rank {args.rank} on {n_layers} attention projections | "
          f"threads {torch.get_num_threads()} | {rounds} rounds")  # fmt: skip
    images = {name: [] for name in variants}
    steps_t = {name: [] for name in variants}
    for setup in variants.values():  # warm-up (allocator, kernels, first-call caches)
        setup()
        generate(pipe, size, 1)
    order = list(variants)
    for r in range(rounds):  # round-robin, rotating who goes first: drifting load hits every variant alike
        for name in order[r % len(order) :] + order[: r % len(order)]:
            setup = variants[name]
            setup()
            for _ in range(unet_reps):
                steps_t[name].append(unet_step(pipe, size))
            images[name].append(generate(pipe, size, steps))
    flops = {}
    for name, setup in variants.items():  # deterministic: what each variant computes, free of timing noise
        setup()
        with FlopCounterMode(display=False) as counter:
            unet_step(pipe, size)
        flops[name] = counter.get_total_flops()
    print("\nUNet step FLOPs: " + ", ".join(f"{n} {f / flops['base']:.4f}x" for n, f in flops.items()))
    report("UNet step (CFG batch 2)", "s/step", steps_t)
    report(f"pipeline ({steps} steps + text encoder + VAE decode)", "s/image", images)
    lora_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
