"""Throughput of the evaluation metrics at real sizes (random weights, no download), in one run.

Models: DINO ViT-S/16 (transformers folder), CLIP ViT-B/32 (loaded by open_clip from a checkpoint file
via ``pretrained=PATH``; ``--clip_arch ViT-L-14`` for the seed paper's size), LPIPS AlexNet at 256 px.
Images: random 512×512 RGB, as SD1.5 generates.

Prints images/s of each feature extractor, the time the 3000-image DreamBooth benchmark (30 subjects ×
25 prompts × 4 images, ~5 photos per subject) would take, and the speed-up of all-pairs LPIPS from
per-image features over ``lpips.LPIPS`` called once per pair.

    python benchmarks/metrics_bench.py                 # CPU (or the GPU when present)
    python benchmarks/metrics_bench.py --device cuda --images 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from nblora_diffusion.metrics import ClipFeatures, DinoFeatures, LpipsFeatures
from nblora_diffusion.testing.metric_models import make_clip, make_dino, make_lpips

from common import add_device_option, device_of

BENCH_IMAGES, PHOTOS_PER_SUBJECT, SUBJECTS, PER_PROMPT = 3000, 5, 30, 4


def timed(fn, device: torch.device, repeat: int = 1) -> float:
    fn()  # warm-up (kernels, allocator, lazy inits)
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_option(parser)
    parser.add_argument("--images", type=int, default=None, help="images per timing (32 CPU, 256 GPU)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 16 CPU, 128 GPU")
    parser.add_argument("--clip_arch", default="ViT-B-32")
    parser.add_argument("--lpips_size", type=int, default=256)
    a = parser.parse_args(argv)
    device = device_of(a.device)
    gpu = device.type == "cuda"
    n, bs = a.images or (256 if gpu else 32), a.batch_size or (128 if gpu else 16)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(512, 512, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
    texts = ["a dog wearing a santa hat"] * n

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dino = DinoFeatures(str(make_dino(tmp / "dino", tiny=False)), device, batch_size=bs)
        clip_dir = make_clip(tmp / "clip", arch=a.clip_arch)
        clip_file = str(clip_dir / "open_clip_model.safetensors")  # open_clip's pretrained=PATH route
        clip = ClipFeatures(a.clip_arch, clip_file, device, batch_size=bs)
        lpips_file = str(make_lpips(tmp / "lpips.pth"))
        lp = LpipsFeatures("alex", lpips_file, device, size=a.lpips_size, batch_size=bs)

    s = {
        "DINO ViT-S/16": timed(lambda: dino.features(images), device),
        f"CLIP {a.clip_arch} image": timed(lambda: clip.features(images), device),
        f"CLIP {a.clip_arch} text": timed(lambda: clip.text_features(texts), device),
        f"LPIPS alex {a.lpips_size}px features": timed(lambda: lp.features(images), device),
    }
    feats = lp.features(images)
    photos = [f[:PHOTOS_PER_SUBJECT] for f in feats]
    pair_s = timed(lambda: lp.pairwise(feats, photos), device, repeat=3) / (n * PHOTOS_PER_SUBJECT)
    k = min(8, n)  # lpips.LPIPS forward, one call per pair, on the same pixels
    x, y = lp._pixels(images[:k]).to(device), lp._pixels(images[:PHOTOS_PER_SUBJECT]).to(device)
    pairs = [(i, j) for i in range(k) for j in range(PHOTOS_PER_SUBJECT)]
    with torch.no_grad():
        naive_s = timed(lambda: [lp.model(x[i : i + 1], y[j : j + 1]) for i, j in pairs], device) / len(pairs)

    print(f"device: {device}, {n} images of 512x512, batch {bs}, threads {torch.get_num_threads()}")
    for name, sec in s.items():
        print(f"  {name:32s} {n / sec:8.1f} images/s")
    per_image = sum(v for k_, v in s.items() if "text" not in k_) / n  # image features of all metrics
    pairs_ref = BENCH_IMAGES * PHOTOS_PER_SUBJECT
    pairs_div = BENCH_IMAGES // PER_PROMPT * PER_PROMPT * (PER_PROMPT - 1) // 2
    total = per_image * (BENCH_IMAGES + SUBJECTS * PHOTOS_PER_SUBJECT) + pair_s * (pairs_ref + pairs_div)
    total += s[f"CLIP {a.clip_arch} text"] / n * BENCH_IMAGES // PER_PROMPT
    print(f"  LPIPS pair from features       {1 / pair_s:8.1f} pairs/s")
    print(f"  LPIPS pair, lpips.LPIPS per pair {1 / naive_s:6.1f} pairs/s")
    print(f"ratio all-pairs-from-features / lpips.LPIPS-per-pair: {naive_s / pair_s:.1f}x")
    print(f"3000-image benchmark, metrics only (images already generated): {total:.0f} s "
          f"= {total / 180:.2f}x the 3-minute target")  # fmt: skip


if __name__ == "__main__":
    main()
