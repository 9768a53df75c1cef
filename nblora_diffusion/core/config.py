"""NBLoRAConfig: what to inject, where, and with which bound; and the checks of its layer-level values
(rank, dropout, parameterization), which the layer and the trainer's config call too."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from ..formats import format_p
from .bounds import check_delta, parse_p

PARAMETERIZATIONS = ("I", "II")  # "II": W = 2BᵀSA (default), "I": W = U·D·Vᵀ (paper §3)


def check_rank(rank: int, name: str = "rank", at_most: tuple[str, int] | None = None) -> int:
    """An integer rank >= 1 (and <= ``at_most`` = (what bounds it, its value), e.g. ("min(out, in)", 6))."""
    valid = not isinstance(rank, bool) and isinstance(rank, int) and rank >= 1
    if at_most is None and not valid:
        raise ValueError(f"{name} must be an integer >= 1, got {rank!r}")
    if at_most is not None and not (valid and rank <= at_most[1]):
        raise ValueError(f"{name} must be an integer in [1, {at_most[0]} = {at_most[1]}], got {rank!r}")
    return rank


def check_dropout(dropout: float, name: str = "dropout") -> float:
    """A dropout probability in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout!r}")
    return dropout


def check_parameterization(parameterization: str) -> str:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be 'I' or 'II', got {parameterization!r}")
    return parameterization


@dataclass(frozen=True)
class NBLoRAConfig:
    rank: int = 4
    p: float | str = math.inf  # Schatten exponent: 1 (nuclear), 2 (Frobenius), inf (spectral), any >= 1
    delta: float | None = None  # absolute bound δ on ‖W‖_Sp; exactly one of delta / gamma
    gamma: float | None = None  # relative bound: δ = γ·‖W_p‖_Sp of each base weight (paper §3)
    target_modules: tuple[str, ...] = ()  # module names matched on path boundaries
    parameterization: str = "II"  # "II": W = 2BᵀSA (default), "I": W = U·D·Vᵀ
    dropout: float = 0.0  # dropout on the adapter input during training
    init_std: float | None = None  # std of Ã at init; None -> 1/sqrt(in_features)

    def __post_init__(self) -> None:
        check_rank(self.rank)
        object.__setattr__(self, "p", parse_p(self.p))
        if (self.delta is None) == (self.gamma is None):
            raise ValueError(
                f"give exactly one of delta and gamma, got delta={self.delta}, gamma={self.gamma}"
            )
        if self.delta is not None:
            object.__setattr__(self, "delta", check_delta(self.delta))
        if self.gamma is not None:
            object.__setattr__(self, "gamma", check_delta(self.gamma, "relative norm bound gamma"))
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        check_parameterization(self.parameterization)
        check_dropout(self.dropout)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["p"] = format_p(self.p)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NBLoRAConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown NB-LoRA config keys: {sorted(unknown)}")
        return cls(**{**d, "target_modules": tuple(d.get("target_modules", ()))})
