"""NB-LoRA DreamBooth app: upload a subject, choose p and δ, train, generate with a norm-bound slider.

    python app/app.py [--base_model ID_DIR_OR_FILE] [--base_model_config NAME_OR_DIR] [--host 127.0.0.1]
                      [--port 7860] [--share]

The command line and the launch only: the page (one module per tab) is nblora_diffusion.app_logic.ui, its
handlers nblora_diffusion.app_logic.handlers.
"""

from __future__ import annotations

import argparse
import sys

from nblora_diffusion.app_logic.train_settings import MICRO_DEFAULTS
from nblora_diffusion.app_logic.ui import create_app, launch_app
from nblora_diffusion.diffusion.single_file import is_single_file
from nblora_diffusion.formats import DEFAULT_BASE_MODEL

__all__ = ["create_app", "launch_app", "main", "parse_args"]  # the tests serve the app through these


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app/app.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base_model",
        default=None,
        help=f"hub id, local diffusers folder or single .safetensors file (default {DEFAULT_BASE_MODEL})",
    )
    parser.add_argument(
        "--base_model_config",
        default=None,
        metavar="NAME_OR_DIR",
        help="configs for a single-file --base_model: sd15, sd21-base, sd21-v, sdxl-base or a diffusers "
        "folder (default: the shipped configs of the architecture its keys show)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the shipped micro SD (32 px micro world, offline) with its metrics and training settings",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--output_dir", default="out/app", help="adapters, uploads and images go here")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    if args.tiny and args.base_model:
        parser.error("give either --tiny or --base_model")
    if args.base_model_config and not (args.base_model and is_single_file(args.base_model)):
        parser.error("--base_model_config applies to a single-file --base_model (.safetensors or .ckpt)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base, metrics, form = args.base_model or DEFAULT_BASE_MODEL, None, None
    if args.tiny:  # the shipped micro SD, judged by the micro world's metrics
        from nblora_diffusion.metrics import MicroWorldConfig
        from nblora_diffusion.microworld import model_path

        base, metrics, form = str(model_path()), MicroWorldConfig(), MICRO_DEFAULTS
    demo, _ = create_app(base, args.output_dir, metrics, base_model_config=args.base_model_config, form=form)
    try:
        print(f"NB-LoRA app on http://{args.host}:{args.port} (base model {base})", flush=True)
        launch_app(demo, args.output_dir, args.host, args.port, args.share)
    except (OSError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
