"""The Cayley transform of tall matrices and its inverse (pure functions, no module state).

Convention (NB-LoRA paper eq. 7): F = [X; Y] with X of shape (r, r) and Y of shape (q - r, r);
Z = X - Xᵀ + YᵀY, M = I + Z, N = M⁻¹ and

    Cayley(F) = [G; H] = [(I - Z) N; -2 Y N] = [2N - I; -2 Y N],

which is semi-orthogonal (GᵀG + HᵀH = I) for every F. The fused path forms N = M⁻¹ (one batched
inversion for all the r×r matrices of a call). Forming the inverse is safe here: the symmetric part
of M is I + YᵀY ⪰ I, so every singular value of M is >= 1 and ‖N‖ <= 1. With N in hand every
q-sized product of the forward and the backward is a GEMM rather than a triangular solve with q
right-hand sides.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _add_identity(A: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """A += alpha·I in place on the last two dims; returns A."""
    A.diagonal(dim1=-2, dim2=-1).add_(alpha)
    return A


def split_runs(blocks: Sequence, counts: Sequence[int]) -> list[Sequence]:
    """A flat list back into its consecutive runs (``counts[g]`` items for run g)."""
    return [blocks[end - n : end] for n, end in zip(counts, itertools.accumulate(counts), strict=True)]


def _slices(sizes: Sequence[int]) -> list[slice]:
    """Consecutive slices of these sizes: the columns of side-by-side blocks, or each group's rows in
    the stacked r×r matrices (M, N) of all groups."""
    return [slice(end - n, end) for n, end in zip(sizes, itertools.accumulate(sizes), strict=True)]


# The fused transform is a pair of custom ops, each opaque to torch.compile: a compiled graph calls
# them like any aten op (one node each, no graph break), and inductor generates no code for the r×r
# algebra inside, which would cost compile time for no speed-up.
@torch.library.custom_op("nblora::cayley", mutates_args=())
def _cayley_op(blocks: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """Cayley transforms of several batches at once, each given as column blocks of Fᵀ: the forward
    op, with a hand-written backward op (paper Appendix C).

    Input: the blocks of every group in one list, ``counts[g]`` of them for group g; a group's blocks
    T_k have shape (L_g, r, q_k) with Fᵀ = [T_0, T_1, ...] and q_0 >= r (for adapters the blocks are
    their parameters Ã (r, n) and B̃ (r, m), stacked over the layers of one shape). Output: Qᵀ =
    [G; H]ᵀ of each group (L_g, r, q_g), then M and N of all groups stacked (ΣL_g, r, r): the r×r
    algebra (M's inverse and the backward's r×r products) runs once for all groups, and every q-sized
    product is one batched GEMM per group on row-major operands of unit stride.

    Derivation, with the sign of the paper's first ∇Y term corrected. With G = 2N - I, H = -2YN:
        dL = <∇G, 2 dN> + <∇H, -2 dY N - 2 Y dN>,   dN = -N dM N,   dM = dX - dXᵀ + dYᵀY + YᵀdY.
    Collecting the dN terms, K = 2∇G - 2Yᵀ∇H and ∇M = -Nᵀ K Nᵀ. Then
        ∇X = ∇M - ∇Mᵀ,
        ∇Y = Y (∇M + ∇Mᵀ) - 2 ∇H Nᵀ.
    Y is not saved: Y = -½ H M, so -2Yᵀ∇H = Mᵀ (Hᵀ∇H) and Y (∇M + ∇Mᵀ) = H C with
    C = -½ M (∇M + ∇Mᵀ). Only Qᵀ and the r×r matrices M, N are kept for backward; its q-sized
    products (Hᵀ∇H, Cᵀ Hᵀ, N ∇Hᵀ) are GEMMs.
    """
    Fts = [torch.cat(group, dim=-1) if len(group) > 1 else group[0] for group in split_runs(blocks, counts)]
    r = Fts[0].shape[-2]
    Ms = []
    for Ft in Fts:
        Xt, Yt = Ft[..., :r], Ft[..., r:]  # Xᵀ (L, r, r), Yᵀ (L, r, q - r)
        Ms.append(torch.baddbmm(Xt.mT - Xt, Yt, Yt.mT))  # X - Xᵀ + YᵀY
    M = _add_identity(torch.cat(Ms))
    N = torch.linalg.inv_ex(M).inverse.contiguous()  # never singular: σ_min(M) >= 1
    # Qᵀ = -2 Nᵀ Fᵀ on the whole of Fᵀ, so that every GEMM writes a contiguous tensor; its first r
    # columns (Gᵀ's place) are then overwritten by a copy, never an `out=` into that strided view
    # (torch.compile cannot trace one)
    Nt2, Gt = N.mT * -2.0, _add_identity(N.mT * 2.0, -1.0)  # Gᵀ = 2Nᵀ - I
    Qts = []
    for Ft, rows in zip(Fts, _slices([Ft.shape[0] for Ft in Fts]), strict=True):
        Qt = torch.bmm(Nt2[rows], Ft)
        Qt[..., :r].copy_(Gt[rows])
        Qts.append(Qt)
    return [*Qts, M, N]  # M, N: kept for the backward


@_cayley_op.register_fake
def _(blocks: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    groups = split_runs(blocks, counts)
    L, r = sum(group[0].shape[0] for group in groups), blocks[0].shape[-2]
    Qts = [group[0].new_empty(*group[0].shape[:-1], sum(b.shape[-1] for b in group)) for group in groups]
    return [*Qts, blocks[0].new_empty(L, r, r), blocks[0].new_empty(L, r, r)]


@torch.library.custom_op("nblora::cayley_backward", mutates_args=())
def _cayley_backward_op(
    saved: list[torch.Tensor], grads: list[torch.Tensor], widths: list[int], counts: list[int]
) -> list[torch.Tensor]:
    """The gradients of the blocks of Fᵀ (``widths``: their q_k, ``counts[g]`` of them for group g)
    from M, N, the outputs Qᵀ_g and their gradients."""
    M, N, *Qts = saved
    r = M.shape[-1]
    HtgH = torch.cat([torch.bmm(Qt[..., r:], gQt[..., r:].mT) for Qt, gQt in zip(Qts, grads, strict=True)])
    gGt = torch.cat([gQt[..., :r] for gQt in grads])  # ∇Gᵀ of every group: (ΣL, r, r)
    K = torch.baddbmm(gGt.mT, M.mT, HtgH, beta=2.0)  # 2∇G + Mᵀ(Hᵀ∇H)
    grad_M = torch.bmm(torch.bmm(N.mT, K), N.mT).neg_()
    Ct = torch.bmm(grad_M + grad_M.mT, M.mT).mul_(-0.5)  # Cᵀ = -½ (∇M + ∇Mᵀ)ᵀ Mᵀ, symmetric part
    grad_Xt, N2 = grad_M.mT - grad_M, N * -2.0
    # ∇Yᵀ = Cᵀ Hᵀ - 2 N ∇Hᵀ block by block: contiguous GEMM outputs in the layout of the parameters
    # they are the gradients of (autograd would copy a strided view of one (L, r, q) gradient for
    # every layer), then ∇Xᵀ in block 0's first r columns
    grad_blocks = []
    rows_of = _slices([Qt.shape[0] for Qt in Qts])
    for Qt, gQt, rows, ws in zip(Qts, grads, rows_of, split_runs(widths, counts), strict=True):
        group = [torch.bmm(Ct[rows], Qt[..., c]).baddbmm_(N2[rows], gQt[..., c]) for c in _slices(ws)]
        group[0][..., :r].copy_(grad_Xt[rows])
        grad_blocks += group
    return grad_blocks


@_cayley_backward_op.register_fake
def _(saved: list[torch.Tensor], grads: list[torch.Tensor], widths: list[int], counts: list[int]):
    Qts = [Qt for Qt, count in zip(saved[2:], counts, strict=True) for _ in range(count)]
    return [Qt.new_empty(*Qt.shape[:-1], width) for Qt, width in zip(Qts, widths, strict=True)]


def _setup_context(ctx, inputs, output) -> None:
    ctx.widths, ctx.counts = [b.shape[-1] for b in inputs[0]], inputs[1]
    ctx.save_for_backward(*output[-2:], *output[:-2])  # M, N, then the Qᵀ_g


def _backward(ctx, grads: list) -> tuple:
    M, N, *Qts = ctx.saved_tensors
    grads = [torch.zeros_like(Qt) if g is None else g for g, Qt in zip(grads[: len(Qts)], Qts, strict=True)]
    grad_blocks = _cayley_backward_op([M, N, *Qts], grads, ctx.widths, ctx.counts)
    return grad_blocks, None  # (M and N's gradients: unused)


_cayley_op.register_autograd(_backward, setup_context=_setup_context)


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
    (Qt,) = cayley_transposed([F.mT], fused=fused)
    return Qt.mT


def cayley_transposed(blocks: Sequence[torch.Tensor], *, fused: bool = True) -> tuple[torch.Tensor, ...]:
    """``cayley`` on Fᵀ given as column blocks: Fᵀ = [T_0, T_1, ...], T_k of shape (..., r, q_k), q_0 >= r.

    Returns the matching column blocks of Cayley(F)ᵀ. This is the form the layers use: Fᵀ of an
    adapter is [Ã, B̃], its parameters as they are, and A, B are the output blocks (views of one
    Qᵀ), so a batch of adapters needs no transposition. Same precision handling as ``cayley``. One
    group of ``cayley_transposed_groups``.
    """
    return cayley_transposed_groups([blocks], fused=fused)[0]


def _check_blocks(blocks: Sequence[torch.Tensor]) -> None:
    if not blocks or blocks[0].dim() < 2 or not 1 <= blocks[0].shape[-2] <= blocks[0].shape[-1]:
        got = tuple(blocks[0].shape) if blocks else "no blocks"
        raise ValueError(f"cayley_transposed expects a first block (..., r, q_0), q_0 >= r >= 1, got {got}")
    if any(b.shape[:-1] != blocks[0].shape[:-1] or b.dtype != blocks[0].dtype for b in blocks):
        got = [(tuple(b.shape), str(b.dtype)) for b in blocks]
        raise ValueError(f"cayley_transposed blocks must share (..., r) and dtype, got {got}")


def _blocks_of(Qt: torch.Tensor, blocks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Qᵀ in the column blocks of the input, as views (one block: Qᵀ itself, whose gradient then
    needs no concatenation)."""
    return (Qt,) if len(blocks) == 1 else Qt.split([b.shape[-1] for b in blocks], dim=-1)


def cayley_transposed_groups(
    groups: Sequence[Sequence[torch.Tensor]], *, fused: bool = True
) -> list[tuple[torch.Tensor, ...]]:
    """``cayley_transposed`` of several groups of blocks (each its own batch shape and q_k): the
    fused path transforms all groups of one rank, dtype and device in one call of the op, so the r×r
    algebra runs once for them. Returns the output blocks per group."""
    for blocks in groups:
        _check_blocks(blocks)
    parts: dict[tuple, list[int]] = {}  # one op call per (r, dtype, device)
    for g, blocks in enumerate(groups):
        parts.setdefault((blocks[0].shape[-2], blocks[0].dtype, blocks[0].device), []).append(g)
    results: list = [None] * len(groups)
    for (r, dtype, device), members in parts.items():
        work = [[b.float() if dtype in _LOW_PRECISION else b for b in groups[g]] for g in members]
        autocast = torch.is_autocast_enabled(device.type)
        with torch.autocast(device_type=device.type, enabled=False) if autocast else contextlib.nullcontext():
            if fused:
                flat = [b.reshape(-1, r, b.shape[-1]) for blocks in work for b in blocks]
                Qts = _cayley_op(flat, [len(blocks) for blocks in work])[: len(work)]
            else:
                Qts = [_plain_cayley(torch.cat(blocks, dim=-1).mT).mT for blocks in work]
        done = [
            _blocks_of(Qt.reshape(*blocks[0].shape[:-1], Qt.shape[-1]), blocks)
            for Qt, blocks in zip(Qts, work, strict=True)
        ]
        for g, outs in zip(members, done, strict=True):
            results[g] = tuple(o.to(dtype) for o in outs)
    return results


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
