"""Bound vectors s = δ·softmax(s̃/√r)^(1/p), Schatten norms, projections and the p parser."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nblora_diffusion.core.bounds import (
    bound_vector,
    fit_bound,
    matrix_schatten_norm,
    parse_p,
    project_to_ball,
    s_tilde_for,
    schatten_norm,
)

P_VALUES = st.sampled_from([1.0, 2.0, 3.5, math.inf]) | st.floats(1.0, 50.0)
LARGE_P = P_VALUES | st.floats(50.0, 1e3)  # (floor·δ)^p underflows float64 from p ≈ 25 on


@settings(max_examples=60, deadline=None)
@given(
    p=P_VALUES,
    r=st.integers(1, 64),
    delta=st.floats(1e-3, 1e3),
    spread=st.floats(0, 100),
    seed=st.integers(0, 999),
)
def test_bound_vector_has_p_norm_exactly_delta(p, r, delta, spread, seed):
    s_tilde = torch.randn(r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * spread
    s = bound_vector(s_tilde, p, delta)
    assert s.shape == (r,) and bool((s >= 0).all())
    assert math.isclose(float(schatten_norm(s, p)), delta, rel_tol=10 * r * torch.finfo(torch.float64).eps)


def test_bound_vector_is_uniform_at_init_and_constant_for_p_inf():
    r, delta = 8, 2.0
    s = bound_vector(torch.zeros(r), 2.0, delta)
    assert torch.allclose(s, torch.full((r,), delta / math.sqrt(r)))
    assert torch.equal(bound_vector(torch.randn(r), math.inf, delta), torch.full((r,), delta))


def test_bound_vector_gradient_is_finite_when_one_direction_dominates():
    s_tilde = torch.tensor([400.0, -400.0, 0.0], requires_grad=True)
    bound_vector(s_tilde, 3.5, 1.0).sum().backward()
    assert torch.isfinite(s_tilde.grad).all()


def test_bound_vector_batches_over_leading_dims_with_per_row_delta():
    s_tilde = torch.randn(5, 6, dtype=torch.float64)
    delta = torch.linspace(0.5, 2.5, 5, dtype=torch.float64).unsqueeze(-1)
    batched = bound_vector(s_tilde, 2.0, delta)
    for i in range(5):
        assert torch.allclose(batched[i], bound_vector(s_tilde[i], 2.0, float(delta[i])), rtol=1e-15, atol=0)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, math.inf])
def test_s_tilde_for_inverts_bound_vector(p):
    s = bound_vector(torch.randn(7, dtype=torch.float64), p, 3.0)
    assert torch.allclose(bound_vector(s_tilde_for(s, p), p, 3.0), s, rtol=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5, math.inf])
def test_matrix_schatten_norm_matches_singular_values(p):
    W = torch.randn(9, 6, dtype=torch.float64)
    sigma = torch.linalg.svdvals(W)
    expected = sigma.max() if math.isinf(p) else (sigma**p).sum() ** (1 / p)
    assert torch.allclose(matrix_schatten_norm(W, p), expected, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    p=P_VALUES,
    r=st.integers(1, 16),
    delta=st.floats(0.1, 10),
    scale=st.floats(0.01, 100),
    seed=st.integers(0, 999),
)
def test_project_to_ball_lands_in_the_ball_and_keeps_inside_points(p, r, delta, scale, seed):
    sigma = torch.rand(r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale
    out = project_to_ball(sigma, p, delta)
    assert bool((out >= 0).all())
    assert float(schatten_norm(out, p)) <= delta * (1 + 1e-12)
    if float(schatten_norm(sigma, p)) <= delta:
        assert torch.equal(out, sigma)


def test_project_to_l1_ball_is_the_euclidean_projection():
    sigma = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)
    # soft threshold θ = 1 gives [2, 0, 0]: the nearest point of the l1 ball of radius 2
    assert torch.allclose(
        project_to_ball(sigma, 1.0, 2.0), torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    )


@settings(max_examples=60, deadline=None)
@given(
    p=LARGE_P, r=st.integers(1, 16), fill=st.floats(0, 1), zeros=st.integers(0, 16), seed=st.integers(0, 999)
)
@example(p=28.0, r=2, fill=1.0, zeros=1, seed=0)  # σ = [0, 2], δ = 2: the floor used to underflow to s_1 = 0
@example(p=1e3, r=2, fill=1.0, zeros=1, seed=0)
@example(p=math.inf, r=2, fill=1.0, zeros=1, seed=0)
def test_fit_bound_dominates_sigma_and_has_norm_delta(p, r, fill, zeros, seed):
    delta = 2.0
    sigma = torch.rand(r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    sigma[: min(zeros, r)] = 0
    if float(schatten_norm(sigma, p)) > 0:
        sigma = sigma * (fill * delta / float(schatten_norm(sigma, p)))
    s = fit_bound(sigma, p, delta)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    assert bool((s >= sigma * (1 - 1e-9)).all())
    assert math.isclose(float(schatten_norm(s, p)), delta, rel_tol=1e-12)
    s_tilde = s_tilde_for(s, p)  # the parameters that reach s: finite, and they give s back
    assert bool(torch.isfinite(s_tilde).all())
    assert torch.allclose(bound_vector(s_tilde, p, delta), s, rtol=1e-9, atol=0)


def test_fit_bound_keeps_the_floor_at_p_28():
    s = fit_bound(torch.tensor([0.0, 2.0], dtype=torch.float64), p=28, delta=2)
    assert float(s[0]) == pytest.approx(2e-12, rel=1e-9) and bool(torch.isfinite(s_tilde_for(s, 28)).all())


def test_schatten_norm_does_not_overflow_for_large_p():
    sigma = torch.tensor([3.0, 2.0], dtype=torch.float64)  # 3^1000 overflows float64
    assert math.isclose(float(schatten_norm(sigma, 1e3)), 3.0, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("text", "value"),
    [("inf", math.inf), ("Infinity", math.inf), (" INF ", math.inf), ("2", 2.0), ("3.5", 3.5)],
)
def test_parse_p_accepts_numbers_and_inf_strings(text, value):
    assert parse_p(text) == value


@pytest.mark.parametrize(
    ("p", "shown"),
    [
        (0.5, "0.5"),
        (0, "0"),
        (-2, "-2"),
        ("abc", "'abc'"),
        (True, "True"),
        (float("nan"), "nan"),
        (None, "None"),
    ],
)
def test_parse_p_rejects_bad_values_naming_them(p, shown):
    with pytest.raises(ValueError, match=shown):
        parse_p(p)
