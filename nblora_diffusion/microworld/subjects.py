"""DreamBooth subjects of the micro world: patterned objects the base model has never seen.

Each subject is a fixed kind, colour, pattern and second colour; its 5 "photos" vary background,
position, size and light. ``write_dataset`` lays them out exactly as the DreamBooth benchmark does (one
folder per subject, prompts_and_classes.txt), so ``python -m eval benchmark --dataset DIR`` runs on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .world import COLOR_NAMES, COLORS, POSITION_PHRASES, POSITIONS, Scene, article, render, to_pil

PHOTOS = 5
WHITE, BLACK = (0.97, 0.97, 0.97), (0.08, 0.08, 0.08)


@dataclass(frozen=True)
class Subject:
    name: str
    kind: str  # also its class noun
    color: str
    pattern: str
    second: tuple[float, float, float]

    def scene(self, background: str, position: str, radius: float = 0.24, dy: float = 0.0) -> Scene:
        return Scene(self.kind, self.color, background, position, self.pattern, self.second, radius, dy)

    def backgrounds(self) -> tuple[str, ...]:
        """Backgrounds the subject stands out on (not its own colours)."""
        own = {self.color} | {n for n, c in COLORS.items() if c == self.second}
        return tuple(c for c in COLOR_NAMES if c not in own)


SUBJECTS = (
    Subject("striped_circle", "circle", "blue", "stripes", WHITE),
    Subject("spotted_square", "square", "red", "spots", WHITE),
    Subject("marked_diamond", "diamond", "green", "mark", COLORS["yellow"]),
    Subject("halved_cross", "cross", "purple", "halves", COLORS["orange"]),
    Subject("outlined_triangle", "triangle", "yellow", "outline", BLACK),
    Subject("halved_ring", "ring", "orange", "halves", COLORS["blue"]),
)
BY_NAME = {s.name: s for s in SUBJECTS}
TOKEN = "sks"


def subject(name: str) -> Subject:
    if name not in BY_NAME:
        raise ValueError(f"unknown micro-world subject {name!r}; known: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def photo_scenes(s: Subject, n: int = PHOTOS, seed: int = 0) -> list[Scene]:
    """n varied photos of the subject (deterministic per subject and seed)."""
    g = torch.Generator().manual_seed(seed * 7919 + sum(map(ord, s.name)))
    bgs = s.backgrounds()
    out = []
    for i in range(n):
        bg = bgs[(i + int(torch.randint(len(bgs), (), generator=g))) % len(bgs)]
        out.append(
            s.scene(
                bg,
                POSITIONS[i % len(POSITIONS)],
                radius=0.21 + 0.05 * float(torch.rand((), generator=g)),
                dy=0.12 * float(torch.rand((), generator=g)) - 0.06,
            )
        )
    return out


def photos(s: Subject, n: int = PHOTOS, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) renders in [0, 1]."""
    g = torch.Generator().manual_seed(seed * 104729 + sum(map(ord, s.name)))
    return render(photo_scenes(s, n, seed), g)


def prompt_templates() -> list[str]:
    """Evaluation prompts ({0} = token, {1} = class noun): other backgrounds, positions, both, and
    property changes (another object colour)."""
    out = [f"a photo of {{0}} {{1}} on {article(c)} {c} background" for c in COLOR_NAMES]
    out += [f"a photo of {{0}} {{1}} {POSITION_PHRASES[p]}" for p in POSITIONS]
    out += [
        f"a photo of {{0}} {{1}} on {article(c)} {c} background {POSITION_PHRASES[p]}"
        for c, p in zip(COLOR_NAMES, POSITIONS * 2, strict=True)
    ]
    out += [f"a photo of {article(c)} {c} {{0}} {{1}}" for c in COLOR_NAMES]
    return out


def write_dataset(root: str | os.PathLike, seed: int = 0) -> Path:
    """The micro subjects in the DreamBooth dataset layout: ROOT/<subject>/00.png ... and
    ROOT/prompts_and_classes.txt. Returns ROOT."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for s in SUBJECTS:
        folder = root / s.name
        folder.mkdir(exist_ok=True)
        for i, img in enumerate(to_pil(photos(s, seed=seed))):
            img.save(folder / f"{i:02d}.png")
    items = "\n".join(f"'{t}'.format(unique_token, class_token)," for t in prompt_templates())
    text = (
        "Classes\n\nsubject_name,class\n"
        + "\n".join(f"{s.name},{s.kind}" for s in SUBJECTS)
        + f"\n\nObject Prompts\n\nprompt_list = [\n{items}\n]\n"
        + f"\nLive Subject Prompts\n\nprompt_list = [\n{items}\n]\n"
    )
    (root / "prompts_and_classes.txt").write_text(text, encoding="utf-8")
    return root
