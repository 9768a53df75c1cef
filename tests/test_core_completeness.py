"""Completeness of NB-LoRA: ``set_delta_weight`` reaches any W inside the bound (paper Appendix A-B)."""

from __future__ import annotations

import math

import pytest
import torch

from layer_helpers import P_VALUES, PARAMETERIZATIONS, make_layer, norm_of, tol


def bounded_target(m, n, k, p, norm, seed=0):
    """A rank-k (m, n) float64 matrix with Schatten-p norm ``norm``."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, k, dtype=torch.float64, generator=gen) @ torch.randn(
        k, n, dtype=torch.float64, generator=gen
    )
    return W * (norm / norm_of(W, p)) if norm > 0 else W * 0


@pytest.mark.parametrize("par", PARAMETERIZATIONS)
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize(
    ("k", "fraction"),
    [
        (3, 0.5),
        (3, 1.0),
        (1, 1.0),
        (2, 1.0),
        (4, 0.999),
        (0, 0.0),
    ],  # interior, boundary, rank-deficient boundary, W=0
)
def test_set_delta_weight_round_trips_in_float64(par, p, k, fraction):
    m, n, r, delta = 11, 9, 4, 1.5
    layer = make_layer(m, n, r, p, delta, par)
    k = min(k, r)
    W = bounded_target(m, n, max(k, 1), p, fraction * delta)
    report = layer.set_delta_weight(W)
    err = float((layer.delta_weight().detach() - W).norm()) / max(float(W.norm()), 1e-300)
    assert (err if fraction > 0 else float(layer.delta_weight().detach().abs().max())) <= 1e-8
    assert report["relative_change"] <= 1e-10 or fraction == 0


@pytest.mark.parametrize("par", PARAMETERIZATIONS)
def test_set_delta_weight_reaches_full_rank_boundary_for_p_inf(par):
    """All singular values equal to δ (θ = π/4 in every direction for parameterization II)."""
    m, n, r, delta = 9, 9, 9, 0.7
    Qm, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64))
    layer = make_layer(m, n, r, math.inf, delta, par)
    layer.set_delta_weight(delta * Qm)
    assert torch.allclose(layer.delta_weight(), delta * Qm, rtol=0, atol=1e-10)


@pytest.mark.parametrize("par", PARAMETERIZATIONS)
def test_set_delta_weight_respects_scale(par):
    layer = make_layer(p=2.0, par=par)
    layer.scale = 0.5
    W = bounded_target(7, 5, 3, 2.0, 0.7)  # within the scaled bound 0.75
    layer.set_delta_weight(W)
    assert torch.allclose(layer.delta_weight(), W, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="above the bound"):
        layer.set_delta_weight(W * 1.2)


@pytest.mark.parametrize("par", PARAMETERIZATIONS)
def test_set_delta_weight_accepts_a_float32_lora_product(par):
    """fp32 rounding of a rank-r product is neither extra rank nor extra norm."""
    m, n, r = 64, 48, 4
    torch.manual_seed(0)
    B, A = torch.randn(m, r), torch.randn(r, n)
    W = B @ A
    W = W / norm_of(W, 1.0) * 2.0  # exactly on the nuclear-norm boundary, in float32
    layer = make_layer(m, n, r, 1.0, 2.0, par)
    layer.set_delta_weight(W)
    assert torch.allclose(layer.delta_weight().float(), W, rtol=0, atol=tol(m, torch.float32))


@pytest.mark.parametrize("p", P_VALUES)
def test_set_delta_weight_outside_the_bound_says_by_how_much(p):
    layer = make_layer(p=p)
    W = bounded_target(7, 5, 3, p, 1.5 * 1.25)
    with pytest.raises(ValueError, match=r"above the bound 1\.5 by 25\.0+%"):
        layer.set_delta_weight(W)


@pytest.mark.parametrize("par", PARAMETERIZATIONS)
@pytest.mark.parametrize("p", P_VALUES)
def test_set_delta_weight_projects_onto_the_bound(par, p):
    layer = make_layer(m=9, n=8, r=3, p=p, delta=1.0, par=par)
    W = bounded_target(9, 8, 3, p, 4.0)
    report = layer.set_delta_weight(W, project=True)
    got = layer.delta_weight().detach()
    assert math.isclose(norm_of(got, p), 1.0, rel_tol=1e-9)
    U, sigma, Vh = torch.linalg.svd(W)
    got_sigma = torch.linalg.svdvals(got)[:3]
    assert torch.allclose((U[:, :3] * got_sigma) @ Vh[:3], got, atol=1e-10)  # same singular vectors
    if math.isinf(p):
        assert torch.allclose(got_sigma, sigma[:3].clamp(max=1.0), atol=1e-10)  # clipping
    assert report["relative_change"] > 0.1


def test_set_delta_weight_of_too_high_rank_raises_or_truncates():
    layer = make_layer(m=7, n=6, r=2, p=2.0, delta=10.0)
    W = bounded_target(7, 6, 4, 2.0, 1.0)
    with pytest.raises(ValueError, match="rank > 2"):
        layer.set_delta_weight(W)
    layer.set_delta_weight(W, project=True)
    U, sigma, Vh = torch.linalg.svd(W)
    assert torch.allclose(layer.delta_weight(), (U[:, :2] * sigma[:2]) @ Vh[:2], atol=1e-10)


@pytest.mark.parametrize(
    ("W", "message"),
    [
        (torch.zeros(3, 3), r"shape \(7, 5\)"),
        (torch.full((7, 5), math.nan), "non-finite"),
        (torch.ones(7, 5, dtype=torch.int64), "torch.int64"),
    ],
)
def test_set_delta_weight_rejects_bad_w(W, message):
    with pytest.raises(ValueError, match=message):
        make_layer().set_delta_weight(W)


def test_set_delta_weight_refuses_merged_or_zero_scale_layers():
    layer = make_layer()
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.set_delta_weight(torch.zeros(7, 5))
    layer.unmerge()
    layer.scale = 0
    with pytest.raises(ValueError, match="scale is 0"):
        layer.set_delta_weight(torch.zeros(7, 5))
