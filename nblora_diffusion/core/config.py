"""NBLoRAConfig: what to inject, where, and with which bound."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..formats import format_p
from .bounds import check_delta, parse_p


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
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
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
        if self.parameterization not in ("I", "II"):
            raise ValueError(f"parameterization must be 'I' or 'II', got {self.parameterization!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

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
