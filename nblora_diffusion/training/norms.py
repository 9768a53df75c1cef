"""The norm log (paper Fig. 9): ‖W‖_Sp, δ and σ₁ of each adapted layer's update, from its low-rank factors."""

from __future__ import annotations

import torch

from ..core.bounds import schatten_norm
from .methods import AdapterSetup


def lowrank_svdvals(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of W = left @ rightᵀ for stacks left (N, m, k), right (N, n, k): (N, k), descending.

    Only k×k work: with G_L = LᵀL, G_R = RᵀR and S = G_R^½, the nonzero σ² of W are the eigenvalues
    of S G_L S (WᵀW = R G_L Rᵀ shares them). Batched, so logging every layer costs a few small eighs.
    """
    g_left = left.double().mT @ left.double()  # (N, k, k)
    g_right = right.double().mT @ right.double()
    lam, V = torch.linalg.eigh(g_right)
    S = (V * lam.clamp(min=0).sqrt()[..., None, :]) @ V.mT  # G_R^½
    sigma2 = torch.linalg.eigvalsh(S @ g_left @ S).clamp(min=0)
    return sigma2.sqrt().flip(-1)


@torch.no_grad()
def layer_norms(setup: AdapterSetup) -> list[tuple[str, float, float, float]]:
    """(component.layer, ‖W‖_Sp, δ, σ₁) of every adapted layer's update W."""
    pairs = setup.factor_pairs()
    groups: dict[tuple, list[int]] = {}
    for i, (_, left, right, _, _) in enumerate(pairs):
        groups.setdefault((left.shape, right.shape, left.device), []).append(i)
    sigmas: list[torch.Tensor | None] = [None] * len(pairs)
    for members in groups.values():
        stacked = lowrank_svdvals(
            torch.stack([pairs[i][1] for i in members]), torch.stack([pairs[i][2] for i in members])
        ).cpu()
        for i, s in zip(members, stacked, strict=True):
            sigmas[i] = s
    return [
        (name, float(schatten_norm(s, p)), bound, float(s[0]))
        for (name, _, _, bound, p), s in zip(pairs, sigmas, strict=True)
    ]
