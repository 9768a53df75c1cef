"""The micro world: procedural 32 × 32 px "photos" of one coloured shape on a coloured background.

Everything is deterministic from a seed and rendered on the fly in torch (batched), with anti-aliased
edges (4 × 4 supersampling), a little colour jitter and a soft light gradient so that no two photos are
identical. A scene has four attributes a prompt can name: the object's **kind** (6 shapes), its
**colour** and the **background** colour (6 colours each, never the same) and its horizontal
**position** (left, center, right); its size and vertical offset vary freely.

Pretraining objects are always plain. DreamBooth subjects (``subjects.py``) add a **pattern** (stripes,
spots, a mark, two halves, an outline) in a second colour, which the base model has never seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIZE = 32  # image side in px
SUPERSAMPLE = 4  # anti-aliasing: render at 4× and average-pool

KINDS = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = {  # RGB in [0, 1]; far apart so that a judge reads them back exactly
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.65, 0.22),
    "blue": (0.15, 0.30, 0.88),
    "purple": (0.58, 0.18, 0.75),
}
COLOR_NAMES = tuple(COLORS)
POSITIONS = ("left", "center", "right")
POSITION_X = (0.28, 0.5, 0.72)  # object centre x as a fraction of the width
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
PATTERNS = ("plain", "stripes", "spots", "mark", "halves", "outline")
# words of every caption and DreamBooth prompt of the world: each is one token of the micro tokenizer
WORDS = (
    ("a", "an", "the", "of", "on", "in", "photo", "picture", "background", "with")
    + POSITIONS
    + ("middle",)
    + KINDS
    + COLOR_NAMES
    + ("sks", "zwx", "striped", "spotted", "marked", "white", "black")
)


@dataclass(frozen=True)
class Scene:
    """One photo's content; ``pattern_color`` is used by patterned (subject) objects only."""

    kind: str
    color: str
    background: str
    position: str
    pattern: str = "plain"
    pattern_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    radius: float = 0.22  # object radius as a fraction of the width
    dy: float = 0.0  # vertical offset of the centre (fraction of the height)

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.kind, KINDS, "kind"),
            (self.color, COLOR_NAMES, "colour"),
            (self.background, COLOR_NAMES, "background"),
            (self.position, POSITIONS, "position"),
            (self.pattern, PATTERNS, "pattern"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
        if self.color == self.background:
            raise ValueError(f"object and background have the same colour ({self.color})")


def random_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    """n plain scenes with uniform attributes (object colour != background colour)."""
    g = generator
    kinds = torch.randint(len(KINDS), (n,), generator=g).tolist()
    colors = torch.randint(len(COLOR_NAMES), (n,), generator=g).tolist()
    shift = torch.randint(1, len(COLOR_NAMES), (n,), generator=g).tolist()  # background != colour
    positions = torch.randint(len(POSITIONS), (n,), generator=g).tolist()
    radius = (0.17 + 0.08 * torch.rand(n, generator=g)).tolist()
    dy = (0.16 * torch.rand(n, generator=g) - 0.08).tolist()
    return [
        Scene(
            kind=KINDS[k],
            color=COLOR_NAMES[c],
            background=COLOR_NAMES[(c + s) % len(COLOR_NAMES)],
            position=POSITIONS[p],
            radius=r,
            dy=d,
        )
        for k, c, s, p, r, d in zip(kinds, colors, shift, positions, radius, dy, strict=True)
    ]


def _inside(kind: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Membership of the unit-radius shape at normalised coordinates (u right, v down)."""
    if kind == "circle":
        return u * u + v * v < 1.0
    if kind == "square":
        return (u.abs() < 0.82) & (v.abs() < 0.82)
    if kind == "diamond":
        return u.abs() + v.abs() < 1.08
    if kind == "triangle":  # apex up
        return (v < 0.75) & (u.abs() < (v + 1.0) * 0.55)
    if kind == "cross":
        return ((u.abs() < 0.33) & (v.abs() < 1.0)) | ((v.abs() < 0.33) & (u.abs() < 1.0))
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 < 1.0) & (d2 > 0.5**2)
    raise ValueError(f"unknown kind {kind!r}")


def _pattern_mask(pattern: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where a patterned object shows its second colour (u, v in object radii)."""
    if pattern == "plain":
        return torch.zeros_like(u, dtype=torch.bool)
    if pattern == "stripes":  # three horizontal bands of the second colour
        return torch.remainder(torch.floor((v + 1.0) * 2.5), 2) == 1
    if pattern == "spots":  # a 3 × 3 lattice of dots
        fu = torch.remainder(u * 1.5 + 0.5, 1.0) - 0.5
        fv = torch.remainder(v * 1.5 + 0.5, 1.0) - 0.5
        return fu * fu + fv * fv < 0.22**2
    if pattern == "mark":  # one big central dot
        return u * u + v * v < 0.42**2
    if pattern == "halves":  # right half in the second colour
        return u > 0
    if pattern == "outline":  # handled by the caller (needs the shape); never reached
        raise AssertionError
    raise ValueError(f"unknown pattern {pattern!r}")


def render(scenes: list[Scene], generator: torch.Generator | None = None) -> torch.Tensor:
    """(N, 3, 32, 32) float images in [0, 1]. The generator draws the photographic jitter (colour
    ±4%, light gradient); None gives clean renders."""
    n, hi = len(scenes), SIZE * SUPERSAMPLE
    coords = (torch.arange(hi, dtype=torch.float32) + 0.5) / hi  # (hi,) pixel centres in [0, 1]
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (hi, hi)
    masks = torch.empty(n, 2, hi, hi)  # object coverage, second-colour coverage
    for i, s in enumerate(scenes):
        u = (xx - POSITION_X[POSITIONS.index(s.position)]) / s.radius
        v = (yy - 0.5 - s.dy) / s.radius
        obj = _inside(s.kind, u, v)
        if s.pattern == "outline":  # the rim: points inside whose shrunken copy is outside
            second = obj & ~_inside(s.kind, u / 0.72, v / 0.72)
        else:
            second = obj & _pattern_mask(s.pattern, u, v)
        masks[i, 0], masks[i, 1] = obj, second
    cover = torch.nn.functional.avg_pool2d(masks, SUPERSAMPLE)  # (N, 2, 32, 32) anti-aliased
    bg = torch.tensor([COLORS[s.background] for s in scenes])  # (N, 3)
    fg = torch.tensor([COLORS[s.color] for s in scenes])
    second = torch.tensor([s.pattern_color for s in scenes])
    if generator is not None:
        bg = bg * (1 + 0.08 * (torch.rand(n, 3, generator=generator) - 0.5))
        fg = fg * (1 + 0.08 * (torch.rand(n, 3, generator=generator) - 0.5))
    obj, sec = cover[:, :1], cover[:, 1:]
    img = (
        bg[:, :, None, None] * (1 - obj) + fg[:, :, None, None] * (obj - sec) + second[:, :, None, None] * sec
    )
    if generator is not None:  # soft light from a random direction, ±5%
        angle = 2 * torch.pi * torch.rand(n, generator=generator)
        ramp = (torch.arange(SIZE) + 0.5) / SIZE - 0.5  # (32,)
        light = (
            torch.cos(angle)[:, None, None] * ramp[None, None, :]
            + torch.sin(angle)[:, None, None] * ramp[None, :, None]
        )  # (N, 32, 32)
        img = img * (1 + 0.1 * light[:, None])
    return img.clamp(0, 1)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, generator: torch.Generator | None = None, keep: float = 1.0) -> str:
    """'a photo of a red circle on a blue background on the left' ("an orange ..."); with ``keep`` < 1
    each of colour, background and position is named with that probability (so prompts may leave
    attributes open)."""

    def named() -> bool:
        return keep >= 1.0 or float(torch.rand((), generator=generator)) < keep

    words = ["a photo of"]
    if named():
        words.append(scene.color)
    words.append(scene.kind)
    words.insert(1, article(words[1]))
    if named():
        words.append(f"on {article(scene.background)} {scene.background} background")
    if named():
        words.append(POSITION_PHRASES[scene.position])
    return " ".join(words)


def to_pil(images: torch.Tensor):
    """(N, 3, H, W) in [0, 1] -> list of PIL images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]
