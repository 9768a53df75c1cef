"""The optimizers of ``--optimizer``: torch's AdamW (its default loop or its fused kernel), bitsandbytes'
8-bit AdamW, Prodigy.

The two optional ones come from their own pip packages; a missing package is a one-line ValueError that
names it, raised by ``check_optimizer`` before anything is written.
"""

from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger(__name__)

# --optimizer -> torch's AdamW with these keyword arguments. "adamw_fused": one kernel per step for all
# tensors (CUDA and CPU), the same update as the default loop up to rounding (the transformers Trainer's
# adamw_torch_fused); it pays off most for adapters of many small tensors
_TORCH = {"adamw": {}, "adamw_fused": {"fused": True}}
# --optimizer -> (module to import, pip package, class name) of the optional ones
_OPTIONAL = {
    "adamw8bit": ("bitsandbytes.optim", "bitsandbytes", "AdamW8bit"),
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy"),
}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of ``--optimizer name``; ValueError naming the pip package when it is missing."""
    if name in _TORCH:
        return torch.optim.AdamW
    if name not in _OPTIONAL:
        raise ValueError(f"--optimizer must be one of {', '.join([*_TORCH, *_OPTIONAL])}, got {name!r}")
    module, package, cls = _OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise ValueError(f"--optimizer {name} needs {package}: pip install {package}") from None


def check_optimizer(name: str) -> None:
    optimizer_class(name)


def make_optimizer(
    name: str,
    params: list,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
) -> torch.optim.Optimizer:
    """``--optimizer name`` over ``params`` with the AdamW hyper-parameters of the run.

    Prodigy estimates the step size itself and scales it by ``lr`` (1.0 is its usual value); its weight
    decay is decoupled, as AdamW's.
    """
    cls = optimizer_class(name)
    if name == "prodigy" and lr < 0.1:
        log.warning("Prodigy scales its own step size by --learning_rate (%g); 1.0 is the usual value", lr)
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **_TORCH.get(name, {}))
