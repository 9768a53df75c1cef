"""DreamBooth evaluation metrics: DINO, CLIP-I, CLIP-T, LPIPS (diversity and distance to the photos).

Feature extraction (``extractors``) is separate from scoring (``scoring``), so the scoring is tested
without models; ``MetricSuite`` ties them together for one subject.
"""

from .extractors import (
    METRICS,
    ClipFeatures,
    DinoFeatures,
    LpipsFeatures,
    MetricConfig,
    open_image,
    resolve_device,
)
from .scoring import (
    PairStat,
    cosine_score,
    cross_pairs,
    matched_cosine_score,
    mean_of_means,
    mean_std,
    pairwise_cosine,
    pooled_mean,
    strip_token,
    within_group_pairs,
)
from .suite import MetricSuite, list_images

__all__ = [
    "METRICS",
    "ClipFeatures",
    "DinoFeatures",
    "LpipsFeatures",
    "MetricConfig",
    "MetricSuite",
    "PairStat",
    "cosine_score",
    "cross_pairs",
    "list_images",
    "matched_cosine_score",
    "mean_of_means",
    "mean_std",
    "open_image",
    "pairwise_cosine",
    "pooled_mean",
    "resolve_device",
    "strip_token",
    "within_group_pairs",
]
