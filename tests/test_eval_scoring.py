"""Scoring functions without models: cosines of known vectors, pairing counts, subject averaging."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nblora_diffusion.metrics import (
    PairStat,
    cosine_score,
    cross_pairs,
    matched_cosine_score,
    mean_of_means,
    mean_std,
    pairwise_cosine,
    pooled_mean,
    strip_token,
    within_group_pairs,
)


def test_cosine_score_of_known_vectors():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = cosine_score(a, b)
    assert s.count == 4
    assert s.mean == pytest.approx((1 + 1 / math.sqrt(2) + 0 + 1 / math.sqrt(2)) / 4, abs=1e-12)


def test_cosine_of_opposite_vectors_is_minus_one():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert cosine_score(a, -5 * a).mean == pytest.approx(-1.0, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 5), d=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_cosine_score_ignores_positive_scaling(n, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    scale_a, scale_b = torch.rand(n, 1, generator=g) + 0.1, torch.rand(m, 1, generator=g) * 10 + 0.1
    assert cosine_score(a * scale_a, b * scale_b).mean == pytest.approx(
        cosine_score(a, b).mean, abs=1e-6
    )  # float32 inputs
    assert pairwise_cosine(a, b).shape == (n, m)


def test_exclude_diagonal_drops_self_pairs():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    s = cosine_score(a, a, exclude_diagonal=True)
    assert s.count == 6
    assert s.mean == pytest.approx((0 + 2 * (1 / math.sqrt(2)) * 2) / 6, abs=1e-12)  # (1,0)·(0,1)=0, twice
    with pytest.raises(ValueError, match="same set"):
        cosine_score(a, a[:2], exclude_diagonal=True)


def test_matched_cosine_pairs_each_row_with_its_own_text():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s = matched_cosine_score(img, txt)
    assert (s.count, s.mean) == (2, pytest.approx(0.5))
    with pytest.raises(ValueError, match="same shape"):
        matched_cosine_score(img, txt[:1])


def test_mismatched_embedding_widths_are_a_clear_error():
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        cosine_score(torch.ones(2, 3), torch.ones(2, 4))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), max_size=6))
def test_within_group_pairs_count_is_sum_of_k_choose_2_and_never_cross_groups(sizes):
    pairs = within_group_pairs(sizes)
    assert pairs.shape == (sum(k * (k - 1) // 2 for k in sizes), 2)
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    if len(pairs):
        assert bool((group[pairs[:, 0]] == group[pairs[:, 1]]).all())
        assert bool((pairs[:, 0] < pairs[:, 1]).all())
        assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 7), m=st.integers(0, 7))
def test_cross_pairs_count_every_real_with_every_generated(n, m):
    assert cross_pairs(n, m).shape == (n * m, 2)
    assert cross_pairs(n, n, exclude_diagonal=True).shape == (n * (n - 1), 2)


def test_pooled_mean_weighs_pairs_and_mean_of_means_weighs_subjects():
    dog = PairStat.of(torch.tensor([1.0, 1.0, 1.0]))  # mean 1 over 3 pairs
    bag = PairStat.of(torch.tensor([0.0]))  # mean 0 over 1 pair
    assert pooled_mean([dog, bag]) == pytest.approx(0.75)
    assert mean_of_means([dog, bag]) == pytest.approx(0.5)
    assert (dog + bag).count == 4


def test_pair_stat_round_trips_through_json_dict():
    s = PairStat.of(torch.tensor([0.25, 0.5, 0.125]))
    assert PairStat.from_dict(s.to_dict()) == s
    assert math.isnan(PairStat(0.0, 0).mean)


def test_mean_std_over_subjects():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([4.0]) == (4.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a sks dog in the jungle", "a dog in the jungle"),
        ("sks backpack on the beach", "backpack on the beach"),
        ("a red sks dog", "a red dog"),
        ("a sksdog and a sks", "a sksdog and a"),
    ],
)
def test_strip_token_removes_only_the_whole_token(prompt, expected):
    assert strip_token(prompt, "sks") == expected
    assert strip_token(prompt, "") == prompt
