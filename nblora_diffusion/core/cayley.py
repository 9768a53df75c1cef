"""The Cayley transform of tall matrices and its inverse (pure functions, no module state).

Convention (NB-LoRA paper eq. 7): F = [X; Y] with X of shape (r, r) and Y of shape (q - r, r);
Z = X - Xᵀ + YᵀY, M = I + Z, and

    Cayley(F) = [G; H] = [(I - Z) M⁻¹; -2 Y M⁻¹],

which is semi-orthogonal (GᵀG + HᵀH = I) for every F. M is never inverted explicitly: it is
LU-factored once and the factors are reused by the forward solve and both backward solves.
"""

from __future__ import annotations

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _split(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = F.shape[-1]
    return F[..., :r, :], F[..., r:, :]  # X: (..., r, r), Y: (..., q-r, r)


def _factor(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return M = I + Z, its LU factors and the right-hand side [I - Z; -2Y]."""
    X, Y = _split(F)
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    Z = X - X.mT + Y.mT @ Y  # (..., r, r)
    M = eye + Z
    LU, pivots = torch.linalg.lu_factor(M)
    rhs = torch.cat([eye - Z, -2.0 * Y], dim=-2)  # (..., q, r)
    return M, LU, pivots, rhs


def _right_solve(LU: torch.Tensor, pivots: torch.Tensor, B: torch.Tensor, transpose: bool) -> torch.Tensor:
    """B @ M⁻¹ (transpose=False) or B @ M⁻ᵀ (transpose=True), with M = LU."""
    # B M⁻¹ = (M⁻ᵀ Bᵀ)ᵀ and B M⁻ᵀ = (M⁻¹ Bᵀ)ᵀ
    return torch.linalg.lu_solve(LU, pivots, B.mT, adjoint=not transpose).mT


class _FusedCayley(torch.autograd.Function):
    """Cayley transform with a hand-written backward that reuses the forward's LU factors.

    Derivation (the paper's Appendix C, with the sign of the first ∇Y term corrected). With
    N = M⁻¹, G = 2N - I and H = -2YN:
        dL = <∇G, 2 dN> + <∇H, -2 dY N - 2 Y dN>,   dN = -N dM N,   dM = dX - dXᵀ + dYᵀY + YᵀdY.
    Collecting the dN terms, K = 2∇G - 2Yᵀ∇H and ∇M = -Nᵀ K Nᵀ. Then
        ∇X = ∇M - ∇Mᵀ,
        ∇Y = Y (∇M + ∇Mᵀ) - 2 ∇H Nᵀ.
    Y is not saved: Y = -½ H M, so Yᵀ∇H = -½ Mᵀ (Hᵀ∇H) and Y(∇M + ∇Mᵀ) = -½ H (M (∇M + ∇Mᵀ)).
    Only r×r tensors (M, its LU factors) and the output Q = [G; H] are kept for backward.
    """

    @staticmethod
    def forward(ctx, F: torch.Tensor) -> torch.Tensor:
        M, LU, pivots, rhs = _factor(F)
        Q = _right_solve(LU, pivots, rhs, transpose=False)
        ctx.save_for_backward(Q, M, LU, pivots)
        return Q

    @staticmethod
    def backward(ctx, grad_Q: torch.Tensor) -> torch.Tensor:
        Q, M, LU, pivots = ctx.saved_tensors
        r = Q.shape[-1]
        H = Q[..., r:, :]
        grad_G, grad_H = grad_Q[..., :r, :], grad_Q[..., r:, :]
        K = 2.0 * grad_G + M.mT @ (H.mT @ grad_H)  # (..., r, r)
        T = torch.linalg.lu_solve(LU, pivots, K, adjoint=True)  # Nᵀ K
        grad_M = -_right_solve(LU, pivots, T, transpose=True)  # -Nᵀ K Nᵀ
        grad_X = grad_M - grad_M.mT
        sym = M @ (grad_M + grad_M.mT)  # (..., r, r)
        grad_Y = -0.5 * (H @ sym) - 2.0 * _right_solve(LU, pivots, grad_H, transpose=True)
        return torch.cat([grad_X, grad_Y], dim=-2)


def cayley(F: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """Semi-orthogonal Cayley transform of F, shape (..., q, r) with q >= r (paper eq. 7).

    Batched over leading dimensions. fp16/bf16 inputs (and autocast regions) are computed in
    float32 and the result is cast back: the r×r solve is ill-conditioned in half precision.
    ``fused=False`` differentiates the same forward with plain autograd (a reference for tests and
    benchmarks).
    """
    if F.dim() < 2:
        raise ValueError(f"cayley expects a (..., q, r) tensor, got shape {tuple(F.shape)}")
    q, r = F.shape[-2:]
    if q < r:
        raise ValueError(f"cayley expects a tall matrix (q >= r), got q={q}, r={r}")
    dtype = F.dtype
    work = F.float() if dtype in _LOW_PRECISION else F
    with torch.autocast(device_type=F.device.type, enabled=False):
        if fused:
            Q = _FusedCayley.apply(work)
        else:
            M, _, _, rhs = _factor(work)
            Q = torch.linalg.solve(M, rhs, left=False)  # rhs @ M⁻¹
    return Q.to(dtype)


def inverse_cayley(Q: torch.Tensor) -> torch.Tensor:
    """F with cayley(F) == Q for a semi-orthogonal Q = [G; H] whose I + G is invertible.

    From I + G = 2M⁻¹: M = 2 (I + G)⁻¹, Z = M - I, Y = -½ H M, and X is the skew part of
    Z - YᵀY (the paper's Appendix B). Choose column signs first (see ``cayley_sign_flip``) so that
    I + G is well conditioned.
    """
    q, r = Q.shape[-2:]
    G, H = Q[..., :r, :], Q[..., r:, :]
    eye = torch.eye(r, dtype=Q.dtype, device=Q.device)
    M = 2.0 * torch.linalg.solve(eye + G, eye.expand_as(G))
    Z = M - eye
    Y = -0.5 * H @ M
    X = 0.5 * (Z - Y.mT @ Y)  # skew-symmetric up to rounding, so X - Xᵀ = Z - YᵀY
    return torch.cat([X, Y], dim=-2)


def cayley_sign_flip(G: torch.Tensor) -> torch.Tensor:
    """Column signs P (r,) with |det(I + G·diag(P))| >= 1 for a square G (Appendix B).

    The determinant is affine in each column, det(e_i + g_i, ...) + det(e_i - g_i, ...) =
    2·det of the leading (i-1) block, so choosing the sign with the larger leading minor at each step
    never lets it drop below 1.
    """
    r = G.shape[-1]
    signs = torch.ones(r, dtype=G.dtype, device=G.device)
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    for i in range(r):
        k = i + 1
        plus = eye[:k, :k] + G[:k, :k] * signs[:k]
        minus = plus.clone()
        minus[:, i] = eye[:k, i] - G[:k, i]
        if torch.linalg.det(minus).abs() > torch.linalg.det(plus).abs():
            signs[i] = -1.0
    return signs
