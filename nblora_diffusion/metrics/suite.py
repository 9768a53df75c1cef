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

from ..devices import resolve_device
from .extractors import ClipFeatures, DinoFeatures, LpipsFeatures, MetricConfig, open_image
from .scoring import (
    PairStat,
    cosine_score,
    drift_from_features,
    matched_rows,
    pairwise_cosine,
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
        if self.wants("dino", "drift") and self._dino is None:
            self._dino = DinoFeatures(c.dino_model, self.device, **kw)
        if self.wants("clip_i", "clip_t") and self._clip is None:
            self._clip = ClipFeatures(c.clip_model, c.clip_pretrained, self.device, **kw)
        if self.wants("lpips_div", "lpips_ref") and self._lpips is None:
            self._lpips = LpipsFeatures(
                c.lpips_net, c.lpips_model, self.device, size=c.lpips_size, resize=c.lpips_resize, **kw
            )
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
        """Scores of generated images against one subject's photos, pooled over the prompts."""
        return {m: sum(per, PairStat(0.0, 0)) for m, per in self.score_groups(real, groups, texts).items()}

    def score_groups(
        self, real: Sequence[str | os.PathLike], groups: Sequence[Sequence[Image.Image]], texts: Sequence[str]
    ) -> dict[str, list[PairStat]]:
        """Per-prompt scores of generated images against one subject's photos: metric -> one PairStat
        per prompt (the best-epoch-per-prompt selection of the HRA protocol needs them apart).

        ``groups[k]`` are the images of prompt k and ``texts[k]`` the text CLIP-T compares them with.
        dino/clip_i/lpips_ref: every real photo vs every generated image (pairing "all") or prompt k's
        images vs photo k mod N ("matched"); clip_t: each image vs its text; lpips_div: every pair of
        images within one prompt. Drift needs base-model images: see :meth:`drift`.
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
        out: dict[str, list[PairStat]] = {}
        if self.wants("dino"):
            out["dino"] = self._per_group(pairwise_cosine(self._dino.features(images), R["dino"]), sizes)
        if self.wants("clip_i", "clip_t"):
            G = self._clip.features(images)
            if self.wants("clip_i"):
                out["clip_i"] = self._per_group(pairwise_cosine(G, R["clip"]), sizes)
            if self.wants("clip_t"):
                T = self._clip.text_features(texts).repeat_interleave(torch.tensor(sizes), dim=0)  # (N, D)
                sims = torch.nn.functional.cosine_similarity(G.double(), T.double(), dim=1)  # (N,)
                out["clip_t"] = [PairStat.of(x) for x in sims.split(sizes)]
        if self.wants("lpips_div", "lpips_ref"):
            out.update(self._lpips_scores(groups, R["lpips"]))
        return {m: out[m] for m in self.config.metrics if m in out}

    def _per_group(self, sims: torch.Tensor, sizes: Sequence[int]) -> list[PairStat]:
        """(N, R) image-vs-photo values -> one PairStat per prompt, under the configured pairing."""
        if self.config.pairing == "matched":
            sims = sims.gather(1, matched_rows(sizes, sims.shape[1])[:, None])  # (N, 1): its own photo
        return [PairStat.of(block) for block in sims.split(list(sizes))]

    def _lpips_scores(self, groups: Sequence[Sequence[Image.Image]], real: list[torch.Tensor]) -> dict:
        # whole prompt groups per chunk, so diversity pairs never span two chunks
        chunks: list[list[Sequence[Image.Image]]] = [[]]
        for g in groups:
            if chunks[-1] and sum(map(len, chunks[-1])) + len(g) > self.config.batch_size:
                chunks.append([])
            chunks[-1].append(g)
        div, ref, done = [], [], 0
        for chunk in chunks:
            images = [im for g in chunk for im in g]
            sizes = [len(g) for g in chunk]
            if not images:
                div += [PairStat(0.0, 0)] * len(chunk)
                ref += [PairStat(0.0, 0)] * len(chunk)
                continue
            F = self._lpips.features(images)
            within = self._lpips.pairwise(F, F)
            start = 0
            for k in sizes:
                pairs = within_group_pairs([k]) + start
                div.append(PairStat.of(within[pairs[:, 0], pairs[:, 1]]))
                start += k
            dist = self._lpips.pairwise(F, real)  # (n, R)
            if self.config.pairing == "matched":  # photo index continues across chunks
                rows = matched_rows([0] * done + sizes, dist.shape[1])
                dist = dist.gather(1, rows[:, None])
            ref += [PairStat.of(block) for block in dist.split(sizes)]
            done += len(chunk)
        return {"lpips_div": div, "lpips_ref": ref}

    def drift(self, base: Sequence[Image.Image], adapted: Sequence[Image.Image]) -> PairStat:
        """PEFT's drift, 1 − mean DINO cosine of base-model and adapted images of the same prompts and
        seeds (forgetting; 0 = the base model's images)."""
        if len(base) != len(adapted) or not base:
            raise ValueError(
                f"drift needs matching non-empty image lists, got {len(base)} and {len(adapted)}"
            )
        if self._dino is None:  # drift alone: only the DINO model
            self._dino = DinoFeatures(
                self.config.dino_model,
                self.device,
                batch_size=self.config.batch_size,
                center_crop=self.config.center_crop,
            )
        return drift_from_features(self._dino.features(list(base)), self._dino.features(list(adapted)))

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
        out["drift"] = PairStat(0.0, 0)  # no base model for photos: "–"
        return {m: out[m] for m in self.config.metrics}
