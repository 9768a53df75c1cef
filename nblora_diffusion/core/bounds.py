"""Norm-bound vectors and Schatten norms (pure functions)."""

from __future__ import annotations

import math

import torch

INF = math.inf


def parse_p(p: float | int | str) -> float:
    """Normalise a Schatten exponent: any float >= 1, or inf (also "inf"/"infinity")."""
    if isinstance(p, str):
        text = p.strip().lower()
        if text in ("inf", "infinity", "∞"):
            return INF
        try:
            p = float(text)
        except ValueError:
            raise ValueError(f"norm p must be a number >= 1 or 'inf', got {p!r}") from None
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"norm p must be a number >= 1 or 'inf', got {p!r}")
    p = float(p)
    if math.isnan(p) or p < 1:
        raise ValueError(f"norm p must be >= 1, got {p}")
    return p


def check_delta(delta: float, name: str = "norm bound delta") -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise ValueError(f"{name} must be a positive number, got {delta!r}")
    delta = float(delta)
    if not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {delta}")
    return delta


def bound_vector(s_tilde: torch.Tensor, p: float, delta: float | torch.Tensor) -> torch.Tensor:
    """Per-direction bounds s, shape (r,), with ‖s‖_p = δ (paper §3.1).

    p = inf: s = δ·1. Finite p: s = δ·softmax(s̃/√r)^(1/p), so Σ s_i^p = δ^p exactly. The √r
    temperature keeps the softmax from saturating at large rank.
    """
    r = s_tilde.shape[-1]
    if math.isinf(p):
        # s̃ does not move s here, but it stays in the graph (its gradient is exactly 0): data-parallel
        # training (DDP) fails on a trainable parameter that gets no gradient
        return s_tilde * 0.0 + delta
    # softmax^(1/p) = exp(log_softmax / p): no 0^(1/p) gradient blow-up for tiny weights
    work = s_tilde.float() if s_tilde.dtype in (torch.float16, torch.bfloat16) else s_tilde
    log_w = torch.log_softmax(work / math.sqrt(r), dim=-1)
    return (delta * torch.exp(log_w / p)).to(s_tilde.dtype)


def s_tilde_for(s: torch.Tensor, p: float) -> torch.Tensor:
    """Inverse of ``bound_vector`` for a positive s with ‖s‖_p = δ: s̃ = √r·log(s^p) + const."""
    r = s.shape[-1]
    if math.isinf(p):
        return torch.zeros_like(s)
    log_w = p * torch.log(s)
    return math.sqrt(r) * (log_w - log_w.max())


def schatten_norm(sigma: torch.Tensor, p: float) -> torch.Tensor:
    """‖σ‖_p of singular values σ (last dim), scaled by max |σ| so that σ^p cannot overflow."""
    top = sigma.abs().amax(dim=-1, keepdim=True)
    if math.isinf(p):
        return top.squeeze(-1)
    scale = torch.where(top > 0, top, torch.ones_like(top))
    return (sigma.abs() / scale).pow(p).sum(dim=-1).pow(1.0 / p) * scale.squeeze(-1)


def matrix_schatten_norm(W: torch.Tensor, p: float) -> torch.Tensor:
    """Schatten-p norm of a matrix, computed in float32 or better."""
    W = W.float() if W.dtype in (torch.float16, torch.bfloat16) else W
    if p == 2:
        return torch.linalg.matrix_norm(W, ord="fro")
    return schatten_norm(torch.linalg.svdvals(W), p)


def project_to_ball(sigma: torch.Tensor, p: float, delta: float) -> torch.Tensor:
    """Nonnegative σ (r,) mapped into {‖σ‖_p <= δ}.

    Euclidean projections (the Frobenius-nearest matrix) for p = 1 (soft threshold), p = 2 (scaling)
    and p = inf (clipping); for other p the vector is scaled radially onto the sphere.
    """
    if schatten_norm(sigma, p) <= delta:
        return sigma
    if math.isinf(p):
        return sigma.clamp(max=delta)
    if p == 1:
        # projection onto the simplex-like l1 ball (Duchi et al. 2008)
        u, _ = torch.sort(sigma, descending=True)
        css = torch.cumsum(u, 0) - delta
        idx = torch.arange(1, len(u) + 1, dtype=sigma.dtype, device=sigma.device)
        rho = int(torch.nonzero(u - css / idx > 0).max())
        theta = css[rho] / (rho + 1)
        return (sigma - theta).clamp(min=0)
    return sigma * (delta / schatten_norm(sigma, p))


def fit_bound(sigma: torch.Tensor, p: float, delta: float, floor: float = 1e-12) -> torch.Tensor:
    """A bound vector s (‖s‖_p = δ, s > 0) with s >= σ, given ‖σ‖_p <= δ.

    The slack δ^p - Σσ^p is shared equally; each s_i is at least floor·δ so that s̃ is finite
    (rank-deficient points exactly on the boundary are reached to within that floor). Computed in log
    space on w_i = (s_i/δ)^p, which sum to 1: the floor's w = floor^p underflows float64 for p ≳ 25
    (1e-12^28 = 1e-336) and δ^p overflows for large p.
    """
    if math.isinf(p):
        return torch.full_like(sigma, delta)
    r = sigma.shape[-1]
    log_u = p * torch.log(sigma / delta)  # log (σ_i/δ)^p, -inf for σ_i = 0
    slack = (1.0 - torch.exp(log_u).sum(dim=-1, keepdim=True)).clamp(min=0)  # 1 - ‖σ/δ‖_p^p
    log_w = torch.logaddexp(log_u, torch.log(slack / r)).clamp(min=p * math.log(floor))
    log_w = log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)  # Σ w_i = 1
    return delta * torch.exp(log_w / p)
