"""examples/forgetting.py in quick mode: LoRA vs NB-LoRA at a low and a high learning rate."""

from __future__ import annotations

import pytest
from conftest import load_example, quick_example


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    results, out = quick_example("forgetting", tmp_path_factory)
    runs = {(r["adapter"], r["lr"]): r for r in results["runs"]}
    return results, runs, out


def test_quick_run_writes_its_numbers_and_plot(quick):
    results, runs, out = quick
    assert (out / "forgetting_quick.json").is_file()
    assert (out / "forgetting_quick.png").stat().st_size > 10_000
    assert results["pretrained"]["source_acc"] > 0.8  # the pretrained ViT learned digits 0-4
    assert set(runs) == {("lora", 1e-3), ("lora", 1e-1), ("nblora", 1e-3), ("nblora", 1e-1)}


def test_nblora_update_respects_its_relative_frobenius_bound(quick):
    _, runs, _ = quick
    for lr in (1e-3, 1e-1):
        row = runs[("nblora", lr)]
        assert row["p"] == 2 and row["frobenius_ratio"] <= row["gamma"] * (1 + 1e-4)


def test_lora_degrades_at_high_learning_rate_while_nblora_stays_stable(quick):
    _, runs, _ = quick
    lora_hi, nb_hi = runs[("lora", 1e-1)], runs[("nblora", 1e-1)]
    assert lora_hi["frobenius_ratio"] > 5 * nb_hi["frobenius_ratio"]  # LoRA's update is unbounded
    assert nb_hi["source_acc"] > lora_hi["source_acc"] + 0.2  # ... and destroys the source task
    assert nb_hi["target_acc"] > lora_hi["target_acc"]
    # NB-LoRA keeps most of the source accuracy at either learning rate
    for lr in (1e-3, 1e-1):
        assert runs[("nblora", lr)]["source_acc"] > 0.8 * quick[0]["pretrained"]["source_acc"]


def test_bad_arguments_print_an_error_and_exit_non_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example("forgetting").main(["--quick", "--rank", "0"])
    assert exit_info.value.code != 0
    assert capsys.readouterr().err.startswith("error: --rank")
