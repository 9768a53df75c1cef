"""The micro world's metric suite: the analogues of DINO, CLIP-T and LPIPS, read by the world's judges.

- ``subject``: cosine similarity of judge features (relative to the world's average picture), every
  generated image vs every subject photo (the DINO/CLIP-I analogue; the features ignore background and
  position, as DINO's ignore context);
- ``subject_acc``: the fraction of images the judge reads as the subject (its kind and its pattern);
- ``prompt``: the fraction of the attributes a prompt names (kind, object colour, background, position)
  that the judges read back from its images (the CLIP-T analogue);
- ``diversity``: mean pixel RMS distance between images of the same prompt (the LPIPS-div analogue);
- ``drift`` (``drift_score``): the same distance between base-model and adapted images of one seed on
  the prompts without the token (forgetting); ``python -m eval`` generates both.

Same interface as ``MetricSuite`` (``load``, ``score``, ``reference``), so ``python -m eval`` takes
``--metrics microworld``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .scoring import PairStat, cosine_score, within_group_pairs

MICRO_METRICS = ("subject", "subject_acc", "prompt", "diversity", "drift")
_SCORED = MICRO_METRICS[:4]  # drift needs base-model images: the caller measures it (drift_score)
_WORLD = None


def _world():
    global _WORLD
    if _WORLD is None:
        from ..microworld import judges, world

        _WORLD = (judges, world)
    return _WORLD


@dataclass(frozen=True)
class MicroWorldConfig:
    judge: str | None = None  # judge weights; None: the shipped judge
    subject_kind: str | None = None  # the subject's class noun; None: taken from each prompt
    metrics: tuple[str, ...] = field(default=MICRO_METRICS)
    batch_size: int = 256
    device: str | None = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = sorted(set(self.metrics) - set(MICRO_METRICS))
        if unknown or not self.metrics:
            raise ValueError(
                f"micro-world metrics must be a non-empty subset of {list(MICRO_METRICS)}, "
                f"got {list(self.metrics)}"
            )

    def describe(self) -> dict:
        return {"suite": "microworld", "judge": self.judge or "shipped", "metrics": list(self.metrics)}


def to_tensor(images: Sequence[Image.Image | str | os.PathLike]) -> torch.Tensor:
    """(N, 3, 32, 32) in [0, 1]; other sizes are resized (bilinear) to the world's 32 px."""
    from .extractors import open_image

    out = []
    for im in images:
        im = im if isinstance(im, Image.Image) else open_image(im)
        im = im.convert("RGB")
        if im.size != (32, 32):
            im = im.resize((32, 32), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def prompt_attributes(text: str) -> dict[str, str]:
    """The attributes a prompt names: kind, color, background, position (those present)."""
    _, world = _world()
    words = text.lower().replace(",", " ").split()
    out: dict[str, str] = {}
    kinds = [w for w in words if w in world.KINDS]
    if kinds:
        out["kind"] = kinds[-1]
    m = re.search(r"\b(?:on|in) an? (\w+) background", text.lower())
    if m and m.group(1) in world.COLOR_NAMES:
        out["background"] = m.group(1)
    rest = re.sub(r"\b(?:on|in) an? \w+ background", " ", text.lower())
    colors = [w for w in rest.split() if w in world.COLOR_NAMES]
    if colors:
        out["color"] = colors[0]
    for pos, phrase in world.POSITION_PHRASES.items():
        if phrase in text.lower() or (pos == "center" and "in the middle" in text.lower()):
            out["position"] = pos
    return out


class MicroWorldSuite:
    def __init__(self, config: MicroWorldConfig | None = None) -> None:
        self.config = config or MicroWorldConfig()
        self._judge = None

    def wants(self, *metrics: str) -> bool:
        return any(m in self.config.metrics for m in metrics)

    def load(self) -> MicroWorldSuite:
        if self._judge is None:
            judges, world = _world()
            self._judge = judges.load_judge(self.config.judge)
            # features relative to the world's average picture: unrelated objects then score near 0, as
            # DINO's do, instead of the ~0.8 that positive (pooled GELU) features share
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                self._center = self._judge.features(world.render(world.random_scenes(512, g), g)).mean(0)
        return self

    @torch.no_grad()
    def read(self, x: torch.Tensor) -> dict[str, object]:
        """Judge features and every attribute of a batch of pictures (N, 3, 32, 32)."""
        judges, world = _world()
        self.load()
        feats, kinds, pats = [], [], []
        for i in range(0, len(x), self.config.batch_size):
            chunk = x[i : i + self.config.batch_size]
            f = self._judge.features(chunk)
            feats.append(f - self._center)
            kinds.append(self._judge.kind(f).argmax(1))
            pats.append(self._judge.pattern(f).argmax(1))
        objects = judges.read_object(x)
        return {
            "features": torch.cat(feats),
            "kind": [world.KINDS[i] for i in torch.cat(kinds).tolist()],
            "pattern": [world.PATTERNS[i] for i in torch.cat(pats).tolist()],
            "background": judges.read_background(x),
            "color": [o[0] for o in objects],
            "position": [o[1] for o in objects],
        }

    def _subject_of(self, real: dict) -> tuple[str, str]:
        """The subject's (kind, pattern): the judge's majority reading of its photos."""
        kind = self.config.subject_kind or max(set(real["kind"]), key=real["kind"].count)
        return kind, max(set(real["pattern"]), key=real["pattern"].count)

    def score(
        self, real: Sequence, groups: Sequence[Sequence[Image.Image]], texts: Sequence[str]
    ) -> dict[str, PairStat]:
        if len(groups) != len(texts):
            raise ValueError(f"got {len(groups)} image groups for {len(texts)} prompts")
        if not real:
            raise ValueError("no real images to compare with")
        images = [im for g in groups for im in g]
        if not images:
            raise ValueError("no generated images to score")
        R, x = self.read(to_tensor(real)), to_tensor(images)
        G = self.read(x)
        prompt_of = [t for g, t in zip(groups, texts, strict=True) for _ in g]
        out: dict[str, PairStat] = {"subject": cosine_score(G["features"], R["features"])}
        kind, pattern = self._subject_of(R)
        hits = [k == kind and p == pattern for k, p in zip(G["kind"], G["pattern"], strict=True)]
        out["subject_acc"] = PairStat.of(torch.tensor(hits, dtype=torch.float32))
        out["prompt"] = PairStat.of(
            torch.tensor([self._prompt_hit(G, i, t) for i, t in enumerate(prompt_of)])
        )
        pairs = within_group_pairs([len(g) for g in groups])
        out["diversity"] = PairStat.of(_rms(x[pairs[:, 0]], x[pairs[:, 1]]))
        return {m: out[m] for m in self.config.metrics if m in _SCORED}

    @staticmethod
    def _prompt_hit(G: dict, i: int, text: str) -> float:
        want = prompt_attributes(text)
        return sum(G[a][i] == v for a, v in want.items()) / len(want) if want else float("nan")

    def reference(self, real: Sequence, texts: Sequence[str]) -> dict[str, PairStat]:
        """The real-photos row: photo vs photo (i ≠ j), the photos' own subject and diversity readings."""
        if len(real) < 2:
            raise ValueError(f"the real-images row needs at least 2 photos, got {len(real)}")
        x = to_tensor(real)
        R = self.read(x)
        kind, pattern = self._subject_of(R)
        hits = [k == kind and p == pattern for k, p in zip(R["kind"], R["pattern"], strict=True)]
        pairs = within_group_pairs([len(real)])
        out = {
            "subject": cosine_score(R["features"], R["features"], exclude_diagonal=True),
            "subject_acc": PairStat.of(torch.tensor(hits, dtype=torch.float32)),
            "prompt": PairStat(float("nan"), 0),  # the photos answer no prompt
            "diversity": PairStat.of(_rms(x[pairs[:, 0]], x[pairs[:, 1]])),
            "drift": PairStat(0.0, 1),  # the photos are the photos
        }
        return {m: out[m] for m in self.config.metrics}


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).mean(dim=(1, 2, 3)).sqrt()


def drift_score(base: Sequence[Image.Image], adapted: Sequence[Image.Image]) -> PairStat:
    """Pixel RMS distance between base and adapted images made with the same seeds and prompts."""
    if len(base) != len(adapted) or not base:
        raise ValueError(f"drift needs matching non-empty image lists, got {len(base)} and {len(adapted)}")
    return PairStat.of(_rms(to_tensor(base), to_tensor(adapted)))
