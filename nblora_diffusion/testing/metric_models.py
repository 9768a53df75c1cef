"""Random-weight metric models of the real architectures, saved in the formats their loaders read.

- DINO: a transformers ``ViTModel`` (+ ``ViTImageProcessor``) folder written with ``save_pretrained``.
- CLIP: an open_clip model folder (``open_clip_config.json`` + ``open_clip_model.safetensors``), read by
  ``open_clip.create_model("local-dir:FOLDER")``; the weights file alone is a ``pretrained=PATH`` checkpoint
  for the built-in architecture name when ``arch`` is one (e.g. ``ViT-B-32``).
- LPIPS: the state dict of ``lpips.LPIPS(pretrained=True, pnet_rand=True)`` (random trunk, the package's
  linear layers).

``tiny=True`` shrinks widths and depths (same code paths, seconds to build); ``tiny=False`` gives the
real sizes (ViT-S/16, ViT-B/32) for throughput benchmarks.

    python -m nblora_diffusion.testing.metric_models OUTDIR [--full]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

TINY_CLIP_CFG = {  # ViT-B-32's layout at toy width/depth; the real BPE vocabulary (open_clip's tokenizer)
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class MetricModels:
    dino: Path
    clip: Path
    lpips: Path

    def config(self, **overrides):
        """A MetricConfig that points every metric at these models."""
        from nblora_diffusion.metrics import MetricConfig

        return MetricConfig(
            **{
                "dino_model": str(self.dino),
                "clip_model": str(self.clip),
                "clip_pretrained": None,
                "lpips_model": str(self.lpips),
                **overrides,
            }
        )


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_dino(outdir: str | os.PathLike, tiny: bool = True, seed: int = 0) -> Path:
    """A ViTModel folder shaped like facebook/dino-vits16 (ViT-S/16 at 224 px when not tiny)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    size = (
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        if tiny
        else dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    )
    config = ViTConfig(image_size=224, patch_size=16, qkv_bias=True, **size)
    out = _fresh_dir(Path(outdir))
    ViTModel(config).save_pretrained(out)
    ViTImageProcessor(
        size={"height": 224, "width": 224}, resample=3, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    ).save_pretrained(out)
    return out


def make_dinov2(outdir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny Dinov2Model folder with facebook/dinov2-base's preprocessing (resize 256, crop 224)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14
    )
    out = _fresh_dir(Path(outdir))
    Dinov2Model(config).save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    ).save_pretrained(out)  # fmt: skip
    return out


def make_clip(outdir: str | os.PathLike, arch: str = "tiny", seed: int = 0) -> Path:
    """An open_clip local-dir folder; ``arch`` is 'tiny' or a built-in name such as 'ViT-B-32'."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = TINY_CLIP_CFG if arch == "tiny" else open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg) if arch == "tiny" else open_clip.create_model(arch, pretrained=None)
    out = _fresh_dir(Path(outdir))
    preprocess = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2)
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors")
    )
    return out


def make_lpips(path: str | os.PathLike, net: str = "alex", seed: int = 0) -> Path:
    """The full state dict (trunk + linear layers) of a random-trunk LPIPS, saved with torch.save."""
    import lpips

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def make_metric_models(outdir: str | os.PathLike, tiny: bool = True, seed: int = 0) -> MetricModels:
    outdir = Path(outdir)
    return MetricModels(
        dino=make_dino(outdir / "dino", tiny=tiny, seed=seed),
        clip=make_clip(outdir / "clip", arch="tiny" if tiny else "ViT-B-32", seed=seed),
        lpips=make_lpips(outdir / "lpips_alex.pth", seed=seed),
    )


_CACHE: dict[bool, MetricModels] = {}


def metric_models_path(tiny: bool = True) -> MetricModels:
    """Metric models built once per process in a temporary folder, removed at exit (treat as read-only)."""
    if tiny not in _CACHE or not _CACHE[tiny].lpips.is_file():
        root = Path(tempfile.mkdtemp(prefix="nblora_metric_models_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE[tiny] = make_metric_models(root, tiny=tiny)
    return _CACHE[tiny]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--full", action="store_true", help="real sizes (ViT-S/16 DINO, ViT-B/32 CLIP)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        models = make_metric_models(args.outdir, tiny=not args.full, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) for k, v in models.__dict__.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
