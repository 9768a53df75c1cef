"""Judges of the micro world: read a picture's attributes back.

Exact readers (no learning) for what is measurable: the background colour (the border pixels), the
object colour (the most common palette colour among the foreground pixels) and its position (the
foreground's centroid). A small CNN (``JudgeNet``, trained on renders by ``train_judge``) reads what is
not: the object's kind and its pattern; its pooled features, trained to ignore background and
position, are the world's analogue of DINO features for subject fidelity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .world import COLOR_NAMES, COLORS, KINDS, PATTERNS, POSITION_X, POSITIONS, Scene, random_scenes, render

log = logging.getLogger(__name__)
PALETTE = torch.tensor([COLORS[c] for c in COLOR_NAMES])  # (6, 3)
FOREGROUND = 0.17  # RGB distance from the background that counts as object (half the closest palette pair)


def read_background(images: torch.Tensor) -> list[str]:
    """Nearest palette colour of the median border pixel; images (N, 3, H, W) in [0, 1]."""
    border = torch.cat(
        [images[:, :, :2].flatten(2), images[:, :, -2:].flatten(2), images[:, :, :, :2].flatten(2)], dim=2
    )
    median = border.median(dim=2).values  # (N, 3)
    return [COLOR_NAMES[i] for i in torch.cdist(median, PALETTE).argmin(1).tolist()]


def read_object(images: torch.Tensor) -> list[tuple[str | None, str | None]]:
    """(colour, position) of each picture's object; None where no foreground is found."""
    bgs = PALETTE[[COLOR_NAMES.index(b) for b in read_background(images)]]  # (N, 3)
    px = images.permute(0, 2, 3, 1)  # (N, H, W, 3)
    fg = (px - bgs[:, None, None]).norm(dim=-1) > FOREGROUND  # (N, H, W)
    dist = torch.cdist(px.reshape(len(images), -1, 3), PALETTE)  # (N, H·W, 6)
    nearest, which = dist.min(-1)
    out: list[tuple[str | None, str | None]] = []
    xs = (torch.arange(images.shape[-1]) + 0.5) / images.shape[-1]
    for i in range(len(images)):
        mask = fg[i].flatten()
        if mask.sum() < 4:
            out.append((None, None))
            continue
        solid = mask & (nearest[i] < 0.2)  # skip edges and colours outside the palette
        color = (
            COLOR_NAMES[int(torch.bincount(which[i][solid], minlength=6).argmax())] if solid.any() else None
        )
        cx = float((fg[i].float() * xs).sum() / fg[i].sum())
        pos = POSITIONS[int(torch.tensor([abs(cx - x) for x in POSITION_X]).argmin())]
        out.append((color, pos))
    return out


class JudgeNet(nn.Module):
    """A small CNN: 32 × 32 picture -> 64-d pooled features -> kind and pattern logits."""

    def __init__(self, width: int = 32, features: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.GELU(),  # 16 × 16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.GELU(),  # 8 × 8
            nn.Conv2d(2 * w, features, 3, padding=1), nn.GELU(),
        )  # fmt: skip
        self.kind = nn.Linear(features, len(KINDS))
        self.pattern = nn.Linear(features, len(PATTERNS))
        self.color = nn.Linear(features, len(COLOR_NAMES))  # trains the features to see colour too

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) in [0, 1] -> (N, 64); global max-pooling, so position does not matter."""
        return self.body(images * 2 - 1).amax(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.features(images)
        return self.kind(f), self.pattern(f), self.color(f)


def _judge_scenes(n: int, g: torch.Generator) -> list[Scene]:
    """Plain and patterned scenes with any second colour, sizes a little beyond the world's."""
    scenes = random_scenes(n, g)
    pats = torch.randint(len(PATTERNS), (n,), generator=g).tolist()
    second = torch.rand(n, 3, generator=g)
    fg = torch.tensor([COLORS[s.color] for s in scenes])
    close = (second - fg).norm(dim=1) < 0.35  # a pattern in the object's own colour is no pattern
    second[close] = 1.0 - fg[close]
    second = second.tolist()
    radius = (0.15 + 0.12 * torch.rand(n, generator=g)).tolist()
    return [
        Scene(**{**asdict(s), "pattern": PATTERNS[p], "pattern_color": tuple(c), "radius": r})
        for s, p, c, r in zip(scenes, pats, second, radius, strict=True)
    ]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur and noise of the strength generated pictures show."""
    sigma = float(torch.rand((), generator=g)) * 0.9 + 0.05
    k = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)
    return (x + 0.03 * torch.rand((), generator=g) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _labels(scenes: list[Scene]) -> tuple[torch.Tensor, ...]:
    return (
        torch.tensor([KINDS.index(s.kind) for s in scenes]),
        torch.tensor([PATTERNS.index(s.pattern) for s in scenes]),
        torch.tensor([COLOR_NAMES.index(s.color) for s in scenes]),
    )


def train_judge(steps: int = 3000, batch: int = 128, seed: int = 0) -> JudgeNet:
    torch.manual_seed(seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 11)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        scenes = _judge_scenes(batch, g)
        x = _augment(render(scenes, g), g) if step % 2 else render(scenes, g)
        loss = sum(F.cross_entropy(o, y) for o, y in zip(net(x), _labels(scenes), strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log.info("judge step %d/%d loss %.4f", step + 1, steps, loss)
    return net.eval()


@torch.no_grad()
def judge_accuracy(
    net: JudgeNet, n: int = 1024, seed: int = 12345, augment: bool = False
) -> dict[str, float]:
    """Accuracy of every reader on fresh renders (with the generated-picture augmentation if asked)."""
    g = torch.Generator().manual_seed(seed)
    scenes = _judge_scenes(n, g)
    x = render(scenes, g)
    if augment:
        x = _augment(x, g)
    kind, pattern, _ = (o.argmax(1) for o in net(x))
    plain = [s for s in scenes if s.pattern == "plain"]
    xp = render(plain, torch.Generator().manual_seed(seed + 1))
    objects = read_object(xp)
    return {
        "kind": float((kind == _labels(scenes)[0]).float().mean()),
        "pattern": float((pattern == _labels(scenes)[1]).float().mean()),
        "background": sum(b == s.background for b, s in zip(read_background(x), scenes, strict=True)) / n,
        "color": sum(o[0] == s.color for o, s in zip(objects, plain, strict=True)) / len(plain),
        "position": sum(o[1] == s.position for o, s in zip(objects, plain, strict=True)) / len(plain),
    }


def save_judge(net: JudgeNet, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def load_judge(path: str | Path | None = None) -> JudgeNet:
    """The shipped judge (or the one at ``path``)."""
    from safetensors.torch import load_file

    from . import judge_path

    net = JudgeNet()
    net.load_state_dict(load_file(str(path or judge_path())))
    return net.eval()
