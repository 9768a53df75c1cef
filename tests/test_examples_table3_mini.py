"""examples/table3_mini.py --quick: the report's shape, and a small δ keeps the prompt a large δ loses."""

from __future__ import annotations

import pytest
from conftest import quick_example

from nblora_diffusion.microworld import model_path

pytestmark = pytest.mark.slow
try:
    model_path()
except ValueError as e:  # the weights ship once the pretraining has passed its gates
    pytest.skip(f"the micro SD is not pretrained yet: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return quick_example("table3_mini", tmp_path_factory)


def test_quick_mode_writes_the_report_with_every_checkpoint_and_the_slider(quick):
    results, out = quick
    for name in (
        "results.json",
        "results.csv",
        "results.md",
        "tradeoff.png",
        "slider.png",
        "curve_subject.png",
    ):
        assert (out / name).is_file(), name
    assert results["mode"] == "quick" and results["fidelity"] == "subject" and results["text"] == "prompt"
    assert results["subjects"] == ["striped_circle"]
    methods = {m["id"]: m for m in results["methods"]}
    assert set(methods) == {"nblora_pinf_d0.25", "nblora_pinf_d3.6"}
    for m in methods.values():
        assert sorted(int(k) for k in m["steps"]) == [50, 100]  # every checkpoint scored
        assert m["best_dino_step"] in (50, 100)
        assert {"subject", "subject_acc", "prompt", "diversity"} <= set(m["steps"]["100"])
    assert [r["method"] for r in results["table"]] == [m["name"] for m in results["methods"]]
    assert set(results["slider"]["inf"]["sweep"]) == {"0.25"}  # the large δ's adapter at the small δ


def test_smaller_bound_keeps_the_prompt_that_the_larger_gives_up_and_the_subject_is_learned(quick):
    """The trade-off of Table 3 on the quick run (one subject, 100 steps of batch 1, 16 images a checkpoint).

    Measured in six runs of six training seeds (this run's seed is 0), at each bound's best step: δ = 0.25
    kept the prompt in 0.91-0.97 of its images and δ = 3.6 in 0.19-0.50; subject fidelity 0.34-0.58 for
    δ = 0.25 and 0.43-0.60 for δ = 3.6, the better of the two 0.51-0.60 (the real photos: 0.91). A trainer
    that learns nothing (lr 1e-9): prompt 0.97 for both bounds, subject 0.26 for both. Which bound reached
    the higher subject fidelity changed with the seed, so that order is left to the full benchmark (6
    subjects × 2 seeds, README: Table 3 in miniature), not asserted on one subject here.
    """
    results, _ = quick
    best = {m["options"]["norm_bound"]: m["steps"][str(m["best_dino_step"])] for m in results["methods"]}
    small, large = best[0.25], best[3.6]
    assert small["prompt"]["mean"] > large["prompt"]["mean"] + 0.25, (small["prompt"], large["prompt"])
    learned = max(small["subject"]["mean"], large["subject"]["mean"])
    assert learned >= 0.375 * results["real"]["subject"], (learned, results["real"])
