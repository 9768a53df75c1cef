"""examples/matrix_completion.py in quick mode: the seed's qualitative claims at that size."""

from __future__ import annotations

import pytest
from conftest import load_example, quick_example


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return quick_example("matrix_completion", tmp_path_factory)


def test_quick_run_writes_its_numbers_and_plot(quick):
    results, out = quick
    assert (out / "matrix_completion_quick.json").is_file()
    assert (out / "matrix_completion_quick.png").stat().st_size > 10_000
    assert results["truth"]["numerical_rank"] == 10
    assert results["truth"]["nuclear_norm"] == pytest.approx(390.0, rel=1e-4)


def test_nuclear_norm_never_exceeds_the_bound(quick):
    results, _ = quick
    for rows in results["bounded"].values():
        for row in rows:
            assert row["nuclear_norm"] <= row["delta"] * (1 + 1e-4)


def test_true_norm_beats_an_underestimated_bound_for_both_parameterizations(quick):
    results, _ = quick
    for rows in results["bounded"].values():
        by_delta = {row["delta"]: row for row in rows}
        assert by_delta[390.0]["test_error"] < 0.75 * by_delta[150.0]["test_error"]
        assert by_delta[390.0]["fit_error"] < by_delta[150.0]["fit_error"]


def test_parameterization_ii_keeps_tail_singular_values_lower_when_the_bound_is_overestimated(quick):
    results, _ = quick
    tail = {par: sum(rows[-1]["singular_values"][10:20]) for par, rows in results["bounded"].items()}
    assert results["bounded"]["II"][-1]["delta"] == 900.0
    assert tail["II"] < 0.7 * tail["I"]
    # and the over-estimated bound costs parameterization I test error, as in the seed's sweep
    rows_i = {row["delta"]: row for row in results["bounded"]["I"]}
    assert rows_i[390.0]["test_error"] < rows_i[900.0]["test_error"]


def test_stronger_nuclear_norm_penalty_gives_a_smaller_norm_and_rank(quick):
    results, _ = quick
    weak, strong = sorted(results["penalized"], key=lambda r: r["lambda"])
    assert strong["nuclear_norm"] < weak["nuclear_norm"]
    assert strong["numerical_rank"] <= weak["numerical_rank"]


def test_bad_arguments_print_an_error_and_exit_non_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("matrix_completion").main(["--quick", "--steps", "0"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith("error: --steps") and "Traceback" not in err
