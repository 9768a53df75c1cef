"""The Cayley transform: fused backward vs autograd, orthonormality, inverse, precision handling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nblora_diffusion.core.cayley import (
    cayley,
    cayley_sign_flip,
    cayley_transposed,
    cayley_transposed_groups,
    inverse_cayley,
)

# (batch..., q, r): square, tall, r = 1, one and two leading batch dims
SHAPES = [(3, 3), (7, 3), (5, 1), (2, 9, 4), (2, 3, 6, 2), (1, 12, 12)]


def tol(n: int, dtype: torch.dtype) -> float:
    """Tolerance that scales with size: 10·n·eps."""
    return 10 * n * torch.finfo(dtype).eps


def semi_orthonormality_error(Q: torch.Tensor) -> float:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return float((Q.mT @ Q - eye).abs().max())


@pytest.mark.parametrize("shape", SHAPES)
def test_fused_backward_passes_float64_gradcheck(shape):
    torch.manual_seed(0)
    F = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cayley, (F,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(640, 4), (6, 300, 16), (3, 64, 64)])
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_fused_matches_plain_autograd_in_float32(shape, scale):
    torch.manual_seed(1)
    F = (torch.randn(*shape) * scale).requires_grad_()
    F_ref = F.detach().clone().requires_grad_()
    grad_out = torch.randn(shape)
    Q = cayley(F)
    Q_ref = cayley(F_ref, fused=False)
    (Q * grad_out).sum().backward()
    (Q_ref * grad_out).sum().backward()
    q = shape[-2]
    assert torch.allclose(Q, Q_ref, rtol=0, atol=tol(q, torch.float32))
    rel = float((F.grad - F_ref.grad).norm() / F_ref.grad.norm())
    assert rel < tol(q, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 5), (40, 8), (4, 300, 16), (2, 128, 64)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 10.0])
def test_cayley_columns_are_orthonormal(dtype, shape, scale):
    torch.manual_seed(2)
    Q = cayley(torch.randn(*shape, dtype=dtype) * scale)
    assert Q.shape == shape and Q.dtype == dtype
    assert semi_orthonormality_error(Q) < tol(shape[-2], dtype)


@settings(max_examples=25, deadline=None)
@given(
    q=st.integers(1, 24),
    r_frac=st.floats(0.0, 1.0),
    batch=st.integers(1, 3),
    log_scale=st.floats(-3, 1.5),
    seed=st.integers(0, 2**16),
)
def test_cayley_is_semi_orthogonal_and_fused_agrees_for_any_input(q, r_frac, batch, log_scale, seed):
    r = max(1, round(r_frac * q))
    gen = torch.Generator().manual_seed(seed)
    F = torch.randn(batch, q, r, dtype=torch.float64, generator=gen) * 10**log_scale
    Q = cayley(F)
    # rounding is amplified by the condition number of M = I + X - Xᵀ + YᵀY (up to ~1e4 here)
    X, Y = F[..., :r, :], F[..., r:, :]
    kappa = float(torch.linalg.cond(torch.eye(r, dtype=F.dtype) + X - X.mT + Y.mT @ Y).max())
    assert semi_orthonormality_error(Q) < tol(q, torch.float64) * kappa
    assert torch.allclose(Q, cayley(F, fused=False), rtol=0, atol=tol(q, torch.float64) * kappa)


@pytest.mark.parametrize("sizes", [(3,), (4, 5), (3, 1, 6)])
def test_block_form_is_the_cayley_of_the_concatenation_and_passes_gradcheck(sizes):
    """cayley_transposed([T_0, T_1, ...]) == cayley(cat(T_k)ᵀ)ᵀ split back into the blocks."""
    torch.manual_seed(3)
    blocks = [torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True) for k in sizes]
    assert torch.autograd.gradcheck(lambda *b: cayley_transposed(b), blocks, eps=1e-6, atol=1e-8)
    outs = cayley_transposed(blocks)
    assert [tuple(o.shape) for o in outs] == [tuple(b.shape) for b in blocks]
    expected = cayley(torch.cat(blocks, dim=-1).mT, fused=False).mT
    assert torch.allclose(torch.cat(outs, dim=-1), expected, rtol=0, atol=1e-13)
    plain = cayley_transposed(blocks, fused=False)
    assert all(torch.allclose(o, p, rtol=0, atol=1e-13) for o, p in zip(outs, plain, strict=True))


def test_groups_in_one_call_equal_each_group_alone_and_pass_gradcheck():
    """cayley_transposed_groups: groups of their own batch size, q_k, rank and dtype; those of one rank
    and dtype share one op call, and every group's result is its own transform."""
    torch.manual_seed(4)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    shapes = [[(3, 2, 5), (3, 2, 4)], [(1, 2, 7)], [(2, 3, 6), (2, 3, 2)], [(2, 2, 3)]]  # r = 2, 2, 3, 2
    groups = [[torch.randn(*shape, **f64) for shape in group] for group in shapes]
    flat = [b for group in groups for b in group]

    def run(*blocks):
        it = iter(blocks)
        return tuple(
            o for outs in cayley_transposed_groups([[next(it) for _ in g] for g in groups]) for o in outs
        )

    assert torch.autograd.gradcheck(run, flat, eps=1e-6, atol=1e-8)
    for outs, blocks in zip(cayley_transposed_groups(groups), groups, strict=True):
        alone = cayley_transposed(blocks, fused=False)
        assert all(torch.allclose(o, a, rtol=0, atol=1e-13) for o, a in zip(outs, alone, strict=True))
    half = [[torch.randn(2, 2, 5).half()], [torch.randn(1, 2, 3)]]  # same rank, two dtypes: two calls
    outs = cayley_transposed_groups(half)
    assert [o[0].dtype for o in outs] == [torch.float16, torch.float32]
    reference = cayley_transposed([half[0][0].double()], fused=False)[0]  # float64 of the same fp16 values
    assert torch.allclose(outs[0][0].double(), reference, rtol=0, atol=2 * torch.finfo(torch.float16).eps)


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([], "no blocks"),
        ([torch.randn(3, 2)], r"q_0 >= r >= 1, got \(3, 2\)"),
        ([torch.randn(2, 4), torch.randn(3, 5)], "must share"),
        ([torch.randn(2, 4), torch.randn(2, 5, dtype=torch.float64)], "must share"),
    ],
)
def test_block_form_rejects_mismatched_blocks_naming_them(blocks, message):
    with pytest.raises(ValueError, match=message):
        cayley_transposed(blocks)


def test_zero_bottom_block_gives_zero_bottom_block():
    """The init rule of NB-LoRA: B̃ = 0 makes B = 0, hence W = 0."""
    F = torch.cat([torch.randn(9, 4), torch.zeros(5, 4)])
    Q = cayley(F)
    assert torch.equal(Q[9:], torch.zeros(5, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_computed_in_float32(dtype):
    torch.manual_seed(3)
    F = torch.randn(2, 64, 8).to(dtype).requires_grad_()
    Q = cayley(F)
    assert Q.dtype == dtype
    assert torch.equal(Q, cayley(F.detach().float()).to(dtype))
    Q.float().sum().backward()
    assert F.grad.dtype == dtype and torch.isfinite(F.grad.float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_leaves_the_transform_in_float32(dtype):
    torch.manual_seed(4)
    F = torch.randn(3, 200, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        Q = cayley(F)
    assert Q.dtype == torch.float32
    assert semi_orthonormality_error(Q.detach()) < tol(200, torch.float32)
    Q.sum().backward()
    assert F.grad.dtype == torch.float32


def test_fused_keeps_only_output_and_rxr_tensors_for_backward():
    """Memory claim of the fused backward: saved = Q (q×r) + two r×r matrices; F itself is not kept."""
    L, q, r = 3, 100, 8
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    F = torch.randn(L, r, q, requires_grad=True).mT * 1.0  # a temporary, as in the batched path
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cayley(F)
    assert sum(saved.values()) == 4 * L * (q * r + 2 * r * r)


def test_fused_backward_refuses_double_backward():
    F = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(cayley(F).sum(), F, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


@pytest.mark.parametrize("shape", [(6, 6), (20, 5), (3, 15, 7)])
def test_inverse_cayley_recovers_any_sign_flipped_semi_orthogonal_matrix(shape):
    torch.manual_seed(5)
    Q0, _ = torch.linalg.qr(torch.randn(*shape, dtype=torch.float64))
    r = shape[-1]
    for Q in Q0.reshape(-1, *shape[-2:]):
        P = cayley_sign_flip(Q[:r])
        assert torch.linalg.det(torch.eye(r, dtype=Q.dtype) + Q[:r] * P).abs() >= 1 - 1e-12
        assert torch.allclose(
            cayley(inverse_cayley(Q * P)), Q * P, rtol=0, atol=1e3 * tol(shape[-2], torch.float64)
        )


def test_sign_flip_handles_minus_identity():
    """G = -I makes I + G singular; the flipped signs must repair it completely."""
    G = -torch.eye(4, dtype=torch.float64)
    assert torch.equal(cayley_sign_flip(G), -torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("F", "message"),
    [
        (torch.randn(3, 5), "q=3, r=5"),
        (torch.randn(4), "shape (4,)"),
        (torch.ones(4, 2, dtype=torch.int64), "torch.int64"),
        (torch.randn(4, 0), "r=0"),
    ],
)
def test_cayley_rejects_bad_input_naming_it(F, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cayley(F)


def test_fused_cayley_ops_pass_the_custom_op_checks():
    """The fused transform's two ops (torch.compile calls them as opaque nodes): schema, fake
    implementation, autograd registration and AOT dispatch, as torch.library.opcheck checks them."""
    gen = torch.Generator().manual_seed(0)
    shapes, counts = [(3, 4, 9), (3, 4, 5), (2, 4, 6)], [2, 1]  # two groups: L = 3 with two blocks, L = 2
    blocks = [torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True) for shape in shapes]
    torch.library.opcheck(torch.ops.nblora.cayley.default, (blocks, counts))
    *outs, M, N = torch.ops.nblora.cayley.default([b.detach() for b in blocks], counts)
    assert M.shape == N.shape == (5, 4, 4) and [o.shape for o in outs] == [(3, 4, 14), (2, 4, 6)]
    grads = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
    widths = [shape[-1] for shape in shapes]
    torch.library.opcheck(torch.ops.nblora.cayley_backward.default, ([M, N, *outs], grads, widths, counts))
