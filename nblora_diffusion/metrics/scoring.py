"""Scoring functions: embeddings or distances in, numbers out. No models here.

Every score is a :class:`PairStat` (sum and count over pairs) so that means can be pooled over pairs
(all pairs of all subjects) or taken per subject and then averaged, without keeping the pairs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PairStat:
    """Sum and count of a per-pair quantity; ``a + b`` pools the pairs of both."""

    total: float
    count: int

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def __add__(self, other: PairStat) -> PairStat:
        return PairStat(self.total + other.total, self.count + other.count)

    @classmethod
    def of(cls, values: torch.Tensor) -> PairStat:
        values = values.detach().double().flatten()
        return cls(float(values.sum()), int(values.numel()))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "sum": self.total, "pairs": self.count}

    @classmethod
    def from_dict(cls, d: Mapping) -> PairStat:
        return cls(float(d["sum"]), int(d["pairs"]))


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` (N, D) with every row of ``b`` (M, D) -> (N, M)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected embeddings (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return a @ b.T  # (N, D) @ (D, M) -> (N, M)


def cosine_score(a: torch.Tensor, b: torch.Tensor, exclude_diagonal: bool = False) -> PairStat:
    """Cosine over every pair (a_i, b_j); ``exclude_diagonal`` drops i == j (real vs real, i ≠ j)."""
    sims = pairwise_cosine(a, b)
    if exclude_diagonal:
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"exclude_diagonal needs the same set twice, got {a.shape[0]} and {b.shape[0]} rows"
            )
        sims = sims[~torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)]
    return PairStat.of(sims)


def matched_cosine_score(a: torch.Tensor, b: torch.Tensor) -> PairStat:
    """Cosine of row i of ``a`` with row i of ``b`` (CLIP-T: each image with its own prompt)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"expected two (N, D) embeddings of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    sims = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)  # (N,)
    return PairStat.of(sims)


def within_group_pairs(group_sizes: Sequence[int]) -> torch.Tensor:
    """Index pairs (i, j), i < j, inside each group of consecutive items -> (P, 2), P = Σ k(k-1)/2.

    The LPIPS diversity pairs: images of one prompt are compared with each other, never across prompts.
    """
    pairs, start = [], 0
    for k in group_sizes:
        if k < 0:
            raise ValueError(f"group sizes must be >= 0, got {k}")
        idx = torch.triu_indices(k, k, offset=1) + start  # (2, k(k-1)/2)
        pairs.append(idx.T)
        start += k
    return torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.long)


def cross_pairs(n_a: int, n_b: int, exclude_diagonal: bool = False) -> torch.Tensor:
    """Every (i, j) with i < n_a, j < n_b -> (n_a·n_b, 2); without i == j when ``exclude_diagonal``."""
    i, j = torch.meshgrid(torch.arange(n_a), torch.arange(n_b), indexing="ij")
    pairs = torch.stack([i.flatten(), j.flatten()], dim=1)
    return pairs[pairs[:, 0] != pairs[:, 1]] if exclude_diagonal else pairs


def mean_of_means(stats: Iterable[PairStat]) -> float:
    """Mean of per-subject means (each subject weighs the same, whatever its number of pairs)."""
    means = [s.mean for s in stats]
    return sum(means) / len(means) if means else math.nan


def pooled_mean(stats: Iterable[PairStat]) -> float:
    """Mean over all pairs of all subjects."""
    total = PairStat(0.0, 0)
    for s in stats:
        total = total + s
    return total.mean


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) over subjects."""
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def strip_token(prompt: str, token: str) -> str:
    """The prompt without the rare token, for CLIP-T: 'a sks dog in the jungle' -> 'a dog in the jungle'."""
    if not token:
        return prompt
    out = re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", " ", prompt)
    return " ".join(out.split())


def drift_from_features(base: torch.Tensor, adapted: torch.Tensor) -> PairStat:
    """Forgetting as PEFT's image-gen benchmark measures it: 1 − cosine of the base model's and the
    adapted model's image of the same prompt and seed (DINO features (N, D) each); the mean over the
    pairs is 1 − mean cosine (huggingface/peft method_comparison/image-gen/run.py, ``measure_drift``)."""
    if base.shape != adapted.shape or base.ndim != 2 or not len(base):
        raise ValueError(
            f"drift needs two non-empty (N, D) features of one shape, got {tuple(base.shape)} and "
            f"{tuple(adapted.shape)}"
        )
    cos = torch.nn.functional.cosine_similarity(base.double(), adapted.double(), dim=1)  # (N,)
    return PairStat.of(1 - cos)


def matched_rows(group_sizes: Sequence[int], n_real: int) -> torch.Tensor:
    """The photo each generated image is paired with under 1:1 pairing: prompt k's images with photo
    k mod n_real -> (N,), N = Σ group sizes (PEFT's test pairs: each test prompt with its own photo)."""
    if n_real < 1:
        raise ValueError(f"matched pairing needs at least one photo, got {n_real}")
    return torch.cat(
        [torch.full((k,), i % n_real, dtype=torch.long) for i, k in enumerate(group_sizes)]
        or [torch.zeros(0, dtype=torch.long)]
    )
