"""MetricSuite: the four metrics over one subject's real photos and generated images.

Models are loaded once (on first use) and real-image features are cached per file, so scoring many
checkpoints of one subject embeds its photos once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .extractors import ClipFeatures, DinoFeatures, LpipsFeatures, MetricConfig, open_image, resolve_device
from .scoring import (
    PairStat,
    cosine_score,
    matched_cosine_score,
    within_group_pairs,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder, sorted by name; ValueError for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


class MetricSuite:
    def __init__(self, config: MetricConfig | None = None) -> None:
        self.config = config or MetricConfig()
        self.device = resolve_device(self.config.device)
        self._dino: DinoFeatures | None = None
        self._clip: ClipFeatures | None = None
        self._lpips: LpipsFeatures | None = None
        self._real: dict[tuple, dict] = {}  # file identity -> per-metric features of that photo

    def wants(self, *metrics: str) -> bool:
        return any(m in self.config.metrics for m in metrics)

    def load(self) -> MetricSuite:
        """Load every model the configured metrics need (fails fast on a missing model)."""
        c, kw = self.config, {"batch_size": self.config.batch_size, "center_crop": self.config.center_crop}
        if self.wants("dino") and self._dino is None:
            self._dino = DinoFeatures(c.dino_model, self.device, **kw)
        if self.wants("clip_i", "clip_t") and self._clip is None:
            self._clip = ClipFeatures(c.clip_model, c.clip_pretrained, self.device, **kw)
        if self.wants("lpips_div", "lpips_ref") and self._lpips is None:
            self._lpips = LpipsFeatures(c.lpips_net, c.lpips_model, self.device, size=c.lpips_size, **kw)
        return self

    def real_features(self, paths: Sequence[str | os.PathLike]) -> dict[str, object]:
        """Features of real photos: 'dino'/'clip' (N, D) and 'lpips' (list of layers), cached per file."""
        self.load()
        keys = []
        for p in paths:
            st = Path(p).stat()
            keys.append((str(Path(p).resolve()), st.st_mtime_ns, st.st_size))
        todo = [i for i, k in enumerate(keys) if k not in self._real]
        if todo:
            images = [open_image(paths[i]) for i in todo]
            computed: dict[str, object] = {}
            if self._dino is not None:
                computed["dino"] = self._dino.features(images)
            if self._clip is not None:
                computed["clip"] = self._clip.features(images)
            if self._lpips is not None:
                computed["lpips"] = self._lpips.features(images)
            for row, i in enumerate(todo):
                self._real[keys[i]] = {
                    name: [f[row : row + 1] for f in feats] if name == "lpips" else feats[row : row + 1]
                    for name, feats in computed.items()
                }
        cached = [self._real[k] for k in keys]
        out: dict[str, object] = {}
        for name in cached[0] if cached else ():
            if name == "lpips":
                out[name] = [torch.cat(layer) for layer in zip(*(c[name] for c in cached), strict=True)]
            else:
                out[name] = torch.cat([c[name] for c in cached])
        return out

    def score(
        self, real: Sequence[str | os.PathLike], groups: Sequence[Sequence[Image.Image]], texts: Sequence[str]
    ) -> dict[str, PairStat]:
        """Scores of generated images against one subject's photos.

        ``groups[k]`` are the images of prompt k and ``texts[k]`` the text CLIP-T compares them with.
        dino/clip_i/lpips_ref: every real photo vs every generated image; clip_t: each image vs its text;
        lpips_div: every pair of images within one prompt.
        """
        if len(groups) != len(texts):
            raise ValueError(f"got {len(groups)} image groups for {len(texts)} prompts")
        if not real:
            raise ValueError("no real images to compare with")
        sizes = [len(g) for g in groups]
        images = [im for g in groups for im in g]
        if not images:
            raise ValueError("no generated images to score")
        R = self.real_features(real)
        out: dict[str, PairStat] = {}
        if self.wants("dino"):
            out["dino"] = cosine_score(self._dino.features(images), R["dino"])
        if self.wants("clip_i", "clip_t"):
            G = self._clip.features(images)
            if self.wants("clip_i"):
                out["clip_i"] = cosine_score(G, R["clip"])
            if self.wants("clip_t"):
                T = self._clip.text_features(texts).repeat_interleave(torch.tensor(sizes), dim=0)  # (N, D)
                out["clip_t"] = matched_cosine_score(G, T)
        if self.wants("lpips_div", "lpips_ref"):
            out.update(self._lpips_scores(groups, R["lpips"]))
        return {m: out[m] for m in self.config.metrics}

    def _lpips_scores(self, groups: Sequence[Sequence[Image.Image]], real: list[torch.Tensor]) -> dict:
        # whole prompt groups per chunk, so diversity pairs never span two chunks
        chunks: list[list[Sequence[Image.Image]]] = [[]]
        for g in groups:
            if chunks[-1] and sum(map(len, chunks[-1])) + len(g) > self.config.batch_size:
                chunks.append([])
            chunks[-1].append(g)
        div, ref = PairStat(0.0, 0), PairStat(0.0, 0)
        for chunk in chunks:
            images = [im for g in chunk for im in g]
            if not images:
                continue
            F = self._lpips.features(images)
            pairs = within_group_pairs([len(g) for g in chunk])
            div = div + PairStat.of(self._lpips.pairwise(F, F)[pairs[:, 0], pairs[:, 1]])
            ref = ref + PairStat.of(self._lpips.pairwise(F, real))
        return {"lpips_div": div, "lpips_ref": ref}

    def reference(self, real: Sequence[str | os.PathLike], texts: Sequence[str]) -> dict[str, PairStat]:
        """The real-images row, same code: real vs real (i ≠ j); CLIP-T of each photo with each text."""
        if len(real) < 2:
            raise ValueError(f"the real-images row needs at least 2 photos, got {len(real)}")
        R = self.real_features(real)
        out: dict[str, PairStat] = {}
        if self.wants("dino"):
            out["dino"] = cosine_score(R["dino"], R["dino"], exclude_diagonal=True)
        if self.wants("clip_i"):
            out["clip_i"] = cosine_score(R["clip"], R["clip"], exclude_diagonal=True)
        if self.wants("clip_t"):
            out["clip_t"] = cosine_score(R["clip"], self._clip.text_features(texts))
        if self.wants("lpips_div", "lpips_ref"):
            pairs = within_group_pairs([len(real)])
            d = PairStat.of(self._lpips.pairwise(R["lpips"], R["lpips"])[pairs[:, 0], pairs[:, 1]])
            out["lpips_div"] = out["lpips_ref"] = d  # among the photos, diversity and distance coincide
        return {m: out[m] for m in self.config.metrics}
