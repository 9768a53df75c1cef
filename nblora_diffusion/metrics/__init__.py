"""DreamBooth evaluation metrics: DINO, CLIP-I, CLIP-T, LPIPS (diversity and distance to the photos).

Feature extraction (``extractors``) is separate from scoring (``scoring``), so the scoring is tested
without models; ``MetricSuite`` ties them together for one subject.
"""

from .._deprecated import deprecated_names
from ..devices import resolve_device as _resolve_device
from .extractors import (
    DEFAULT_METRICS,
    METRICS,
    PAIRINGS,
    ClipFeatures,
    DinoFeatures,
    LpipsFeatures,
    MetricConfig,
    open_image,
)
from .microworld import MICRO_METRICS, MicroWorldConfig, MicroWorldSuite, drift_score, prompt_attributes
from .protocols import PROTOCOLS, Protocol, get_protocol, select_best_per_prompt
from .scoring import (
    PairStat,
    cosine_score,
    cross_pairs,
    drift_from_features,
    matched_cosine_score,
    mean_of_means,
    mean_std,
    pairwise_cosine,
    pooled_mean,
    strip_token,
    within_group_pairs,
)
from .suite import MetricSuite, list_images

ALL_METRICS = tuple(dict.fromkeys(METRICS + MICRO_METRICS))  # "drift" is in both suites


def make_suite(config: MetricConfig | MicroWorldConfig | None = None) -> MetricSuite | MicroWorldSuite:
    """The suite for a metric config: DINO/CLIP/LPIPS (the default) or the micro world's judges."""
    return MicroWorldSuite(config) if isinstance(config, MicroWorldConfig) else MetricSuite(config)


def fidelity_metrics(metrics) -> tuple[str | None, str | None]:
    """(subject-fidelity metric, prompt-fidelity metric) of a metric list: DINO and CLIP-T, or the
    micro world's subject and prompt."""
    fid = next((m for m in ("dino", "subject") if m in metrics), None)
    return fid, next((m for m in ("clip_t", "prompt") if m in metrics), None)


__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "PAIRINGS",
    "PROTOCOLS",
    "Protocol",
    "get_protocol",
    "select_best_per_prompt",
    "drift_from_features",
    "MICRO_METRICS",
    "METRICS",
    "MicroWorldConfig",
    "MicroWorldSuite",
    "drift_score",
    "fidelity_metrics",
    "make_suite",
    "prompt_attributes",
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
    "strip_token",
    "within_group_pairs",
]

__getattr__ = deprecated_names(
    __name__, {"resolve_device": ("nblora_diffusion.devices.resolve_device", lambda: _resolve_device)}
)
