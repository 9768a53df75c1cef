#!/usr/bin/env python
"""DreamBooth training of Stable Diffusion (SD1.x/2.x/SDXL) with NB-LoRA or a PEFT baseline.

    python train_dreambooth.py --pretrained_model_name_or_path MODEL --instance_data_dir DIR \\
        --instance_prompt "a photo of sks dog" --output_dir OUT [options]
    accelerate launch train_dreambooth.py ...          # multi-GPU
    python train_dreambooth.py --demo --output_dir demo_out   # offline demo on the micro SD

A thin command line over ``nblora_diffusion.training``: parse -> TrainConfig -> train -> report.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

DEMO_SUBJECT = Path(__file__).resolve().parent / "assets" / "microworld" / "striped_circle"


def parse(argv: list[str] | None):
    """TrainConfig from the command line; with --demo the demo values are the defaults (given options win).

    Returns (config, whether the base model is the shipped micro SD)."""
    from nblora_diffusion.training.config import build_parser, config_from_namespace, demo_overrides

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        if not DEMO_SUBJECT.is_dir():
            raise ValueError(f"--demo needs the bundled photos in {DEMO_SUBJECT}")
        probe = build_parser()
        probe.set_defaults(pretrained_model_name_or_path=None)
        model = probe.parse_args(argv).pretrained_model_name_or_path
        builtin = model is None
        if builtin:
            from nblora_diffusion.microworld import model_path

            model = model_path()
        parser.set_defaults(**demo_overrides(model, DEMO_SUBJECT, args.output_dir))
        args = parser.parse_args(argv)
        return config_from_namespace(args), builtin
    return config_from_namespace(args), False


def report(config, result, builtin_model: bool) -> None:
    """Where everything went, and which tool reads each LoRA file."""
    from nblora_diffusion.diffusion.export import DIFFUSERS_TOOLS, KOHYA_TOOLS

    out = result.output_dir
    state = "stopped" if result.stopped else "finished"
    print(f"training {state} at step {result.final_step}; outputs in {out.resolve()}")
    for name, what in (
        ("nblora_config.json", "NB-LoRA adapter (diffusion.load_adapter)"),
        (
            "pytorch_lora_weights.safetensors",
            f"diffusers LoRA, for {DIFFUSERS_TOOLS} (pipe.load_lora_weights)",
        ),
        ("kohya_lora.safetensors", f"kohya LoRA, for {KOHYA_TOOLS}"),
        ("train_log.csv", "per-step loss and lr"),
        ("norms.csv", "per-layer norm ratio and largest singular value"),
        ("norm_curves.png", "norm curves"),
        ("validation", "validation grids"),
        (config.logging_dir, "TensorBoard logs"),
    ):
        if (out / name).exists():
            print(f"  {out / name}: {what}")
    if result.last_checkpoint:
        print(f"  {result.last_checkpoint}: last checkpoint (--resume_from_checkpoint latest)")
    if builtin_model and not result.stopped:  # the micro SD: show what the adapter learned
        from nblora_diffusion.microworld.demo import slider_grid

        grid, readings = slider_grid(config.pretrained_model_name_or_path, out)
        print(f"  {grid}: base model | adapter at δ' = 0, δ/2, δ, 2δ (rows: prompts)")
        print("  the judge reads the subject in (at δ' = 0, δ/2, δ, 2δ; 4 seeds each):")
        for prompt, shares in readings.items():
            print(f"    {prompt!r}: " + "  ".join(f"{s:4.0%}" for s in shares))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config, builtin_model = parse(argv)
        if config.estimate_memory:  # no training: the peak of these settings, from the model's configs
            from nblora_diffusion.training.memory import estimate_memory

            print(estimate_memory(config).report(config.pretrained_model_name_or_path))
            return 0
        from nblora_diffusion.training import train

        result = train(config)
    except (ValueError, OSError) as e:  # bad input, full disk, permissions: one line, no traceback
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; continue with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":  # one report from a multi-process launch
        report(config, result, builtin_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
