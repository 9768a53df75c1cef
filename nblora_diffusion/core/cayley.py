"""The Cayley transform of tall matrices and its inverse (pure functions, no module state).

Convention (NB-LoRA paper eq. 7): F = [X; Y] with X of shape (r, r) and Y of shape (q - r, r);
Z = X - Xᵀ + YᵀY, M = I + Z, N = M⁻¹ and

    Cayley(F) = [G; H] = [(I - Z) N; -2 Y N] = [2N - I; -2 Y N],

which is semi-orthogonal (GᵀG + HᵀH = I) for every F. The fused path LU-factors M once and forms
N from the factors. Forming the inverse is safe here: the symmetric part of M is I + YᵀY ⪰ I, so
every singular value of M is >= 1 and ‖N‖ <= 1. With N in hand every q-sized product of the forward
and the backward is a GEMM rather than a triangular solve with q right-hand sides.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _add_identity(A: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """A += alpha·I in place on the last two dims; returns A."""
    A.diagonal(dim1=-2, dim2=-1).add_(alpha)
    return A


class _FusedCayley(torch.autograd.Function):
    """Cayley transform of a (L, q, r) batch with a hand-written backward (paper Appendix C).

    Derivation, with the sign of the paper's first ∇Y term corrected. With G = 2N - I, H = -2YN:
        dL = <∇G, 2 dN> + <∇H, -2 dY N - 2 Y dN>,   dN = -N dM N,   dM = dX - dXᵀ + dYᵀY + YᵀdY.
    Collecting the dN terms, K = 2∇G - 2Yᵀ∇H and ∇M = -Nᵀ K Nᵀ. Then
        ∇X = ∇M - ∇Mᵀ,
        ∇Y = Y (∇M + ∇Mᵀ) - 2 ∇H Nᵀ.
    Y is not saved: Y = -½ H M, so -2Yᵀ∇H = Mᵀ (Hᵀ∇H) and Y (∇M + ∇Mᵀ) = H C with
    C = -½ M (∇M + ∇Mᵀ). Only the output Q = [G; H] and the r×r matrices M, N are kept for
    backward; its three q-sized products (Hᵀ∇H, H C, ∇H Nᵀ) are GEMMs.
    """

    @staticmethod
    def forward(ctx, F: torch.Tensor) -> torch.Tensor:
        r = F.shape[-1]
        X, Y = F[:, :r], F[:, r:]  # (L, r, r), (L, q-r, r)
        M = _add_identity(torch.baddbmm(X - X.mT, Y.mT, Y))  # I + X - Xᵀ + YᵀY: (L, r, r)
        LU, pivots, _ = torch.linalg.lu_factor_ex(M)  # never singular: σ_min(M) >= 1
        eye = torch.eye(r, dtype=F.dtype, device=F.device).expand_as(M)
        N = torch.linalg.lu_solve(LU, pivots, eye)  # (L, r, r)
        Q = torch.empty(F.shape, dtype=F.dtype, device=F.device)
        _add_identity(torch.mul(N, 2.0, out=Q[:, :r]), -1.0)  # G = 2N - I
        torch.bmm(Y, N * -2.0, out=Q[:, r:])  # H = -2YN: (L, q-r, r) @ (L, r, r)
        ctx.save_for_backward(Q, M, N)
        return Q

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_Q: torch.Tensor) -> torch.Tensor:
        Q, M, N = ctx.saved_tensors
        r = Q.shape[-1]
        H = Q[:, r:]
        grad_G, grad_H = grad_Q[:, :r], grad_Q[:, r:]
        K = torch.baddbmm(grad_G, M.mT, H.mT @ grad_H, beta=2.0)  # 2∇G + Mᵀ(Hᵀ∇H): (L, r, r)
        grad_M = -(N.mT @ K @ N.mT)
        grad_F = torch.empty(Q.shape, dtype=Q.dtype, device=Q.device)
        torch.sub(grad_M, grad_M.mT, out=grad_F[:, :r])  # ∇X
        C = (M @ (grad_M + grad_M.mT)).mul_(-0.5)
        grad_Y = torch.bmm(H, C, out=grad_F[:, r:])  # (L, q-r, r) @ (L, r, r)
        grad_Y.baddbmm_(grad_H, N.mT * -2.0)  # ∇Y = H C - 2∇H Nᵀ
        return grad_F


def _plain_cayley(F: torch.Tensor) -> torch.Tensor:
    """The textbook formula, differentiated by autograd: the reference for tests and benchmarks."""
    r = F.shape[-1]
    X, Y = F[..., :r, :], F[..., r:, :]
    eye = torch.eye(r, dtype=F.dtype, device=F.device)
    Z = X - X.mT + Y.mT @ Y  # (..., r, r)
    rhs = torch.cat([eye - Z, -2.0 * Y], dim=-2)  # (..., q, r)
    return torch.linalg.solve(eye + Z, rhs, left=False)  # rhs @ (I + Z)⁻¹


def cayley(F: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """Semi-orthogonal Cayley transform of F, shape (..., q, r) with q >= r (paper eq. 7).

    Batched over leading dimensions. fp16/bf16 inputs (and autocast regions) are computed in
    float32 and the result is cast back: the r×r algebra is ill-conditioned in half precision.
    ``fused=False`` differentiates the textbook formula with plain autograd (a reference for tests
    and benchmarks).
    """
    if F.dim() < 2:
        raise ValueError(f"cayley expects a (..., q, r) tensor, got shape {tuple(F.shape)}")
    q, r = F.shape[-2:]
    if q < r or r < 1:
        raise ValueError(f"cayley expects a tall matrix (q >= r >= 1), got q={q}, r={r}")
    if not F.dtype.is_floating_point:
        raise ValueError(f"cayley expects a floating-point tensor, got {F.dtype}")
    dtype = F.dtype
    work = F.float() if dtype in _LOW_PRECISION else F
    autocast = torch.is_autocast_enabled(F.device.type)
    with torch.autocast(device_type=F.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if fused:
            Q = _FusedCayley.apply(work.reshape(-1, q, r)).reshape(F.shape)
        else:
            Q = _plain_cayley(work)
    return Q.to(dtype)


def inverse_cayley(Q: torch.Tensor) -> torch.Tensor:
    """F with cayley(F) == Q for a semi-orthogonal Q = [G; H] whose I + G is invertible.

    From I + G = 2N: M = 2 (I + G)⁻¹, Z = M - I, Y = -½ H M, and X is the skew part of
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
