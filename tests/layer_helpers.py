"""Helpers shared by the NBLoRALinear tests: layers with random parameters, norms, a reference W."""

from __future__ import annotations

import math

import torch
from torch import nn

from nblora_diffusion import NBLoRALinear
from nblora_diffusion.core.bounds import schatten_norm

P_VALUES = [1.0, 2.0, 3.5, math.inf]
PARAMETERIZATIONS = ["I", "II"]


def tol(n: int, dtype: torch.dtype) -> float:
    return 10 * n * torch.finfo(dtype).eps


def make_layer(m=7, n=5, r=3, p=2.0, delta=1.5, par="II", dtype=torch.float64, seed=0) -> NBLoRALinear:
    torch.manual_seed(seed)
    return NBLoRALinear(nn.Linear(n, m).to(dtype), r, p, delta, par)


def randomize(layer: NBLoRALinear, scale: float = 1.0, seed: int = 1) -> NBLoRALinear:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in layer.parameters(recurse=False):
            t.copy_(torch.randn(t.shape, dtype=t.dtype, generator=gen) * scale)
    return layer


def norm_of(W: torch.Tensor, p: float) -> float:
    return float(schatten_norm(torch.linalg.svdvals(W.detach().double()), p))


def fresh_delta_weight(layer: NBLoRALinear) -> torch.Tensor:
    """W from the parameters through the plain-autograd Cayley: no cache, no fused path."""
    A, B = layer.compute_factors(scaled=False, fused=False)
    return (B * layer.scale) @ A
