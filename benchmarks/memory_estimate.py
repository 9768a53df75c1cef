"""Expected peak GPU memory of DreamBooth training, NB-LoRA vs PEFT LoRA, without a GPU or weights.

Runs ``nblora_diffusion.training.memory.estimate_memory`` (the trainer's step on fake tensors of the
real-size models built from the shipped configs) for SD1.5 at 512 px and SDXL at 1024 px, with the
memory-saving flags (fp16 weights and autocast, gradient checkpointing, 8-bit AdamW, cached latents and
text embeddings) and without them, and prints one table row per setting with the NB-LoRA / LoRA ratio.

    python benchmarks/memory_estimate.py [--models sd15,sdxl-base] [--rank 16] [--batch 1] [--prior]
"""

from __future__ import annotations

import argparse
import sys
import time

from nblora_diffusion.training import TrainConfig
from nblora_diffusion.training.memory import GiB, estimate_memory

RESOLUTION = {"sd15": 512, "sd21-base": 512, "sd21-v": 768, "sdxl-base": 1024}
SAVERS = dict(
    mixed_precision="fp16",
    gradient_checkpointing=True,
    optimizer="adamw8bit",
    cache_latents=True,
    cache_text_embeddings=True,
)


def settings(model: str, rank: int, batch: int, prior: bool, savers: bool, adapter: str) -> TrainConfig:
    extra = dict(with_prior_preservation=True, class_data_dir="x", class_prompt="a dog") if prior else {}
    return TrainConfig(
        pretrained_model_name_or_path=model,
        base_model_config=model,
        estimate_memory=True,
        resolution=RESOLUTION[model],
        rank=rank,
        train_batch_size=batch,
        adapter=adapter,
        **(SAVERS if savers else {}),
        **extra,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sd15,sdxl-base")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prior", action="store_true", help="prior preservation (doubles the batch)")
    parser.add_argument("--no_plain", action="store_true", help="only the memory-saving settings")
    a = parser.parse_args(argv)
    print(
        "| model | px | settings | peak NB-LoRA | peak LoRA | NB-LoRA / LoRA | peak phase "
        "| training step NB-LoRA | training step LoRA | NB-LoRA / LoRA | estimate time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for savers in (True,) if a.no_plain else (True, False):
            peaks, took = {}, 0.0
            for adapter in ("nblora", "lora"):
                t0 = time.perf_counter()
                peaks[adapter] = estimate_memory(settings(model, a.rank, a.batch, a.prior, savers, adapter))
                took += time.perf_counter() - t0
            nb, lo = peaks["nblora"], peaks["lora"]
            step = "training step 2"
            label = "fp16, grad ckpt, 8-bit Adam, cached" if savers else "fp32, no savers"
            cells = [
                model,
                RESOLUTION[model],
                label,
                f"{nb.peak / GiB:.2f} GiB",
                f"{lo.peak / GiB:.2f} GiB",
                f"{nb.peak / lo.peak:.4f}",
                max(nb.phases, key=nb.phases.get),
                f"{nb.phases[step] / GiB:.3f} GiB",
                f"{lo.phases[step] / GiB:.3f} GiB",
                f"{nb.phases[step] / lo.phases[step]:.4f}",
                f"{took:.0f} s",
            ]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)
            print(nb.report(f"{model} NB-LoRA ({label})"), file=sys.stderr, flush=True)
            print(lo.report(f"{model} LoRA ({label})"), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
