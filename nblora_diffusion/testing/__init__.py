"""Tiny random-weight model factories for offline tests and demos."""

from __future__ import annotations

__all__ = ["make_tiny_sd", "tiny_sd_path"]


def __getattr__(name: str):
    # lazy, so that `python -m nblora_diffusion.testing.tiny_sd` does not import the module twice
    if name in __all__:
        from . import tiny_sd

        return getattr(tiny_sd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
