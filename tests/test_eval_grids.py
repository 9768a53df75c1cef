"""Method grids with seeds (eval/methods.py, eval/grids.py) and the table3-micro grid's data."""

from __future__ import annotations

import json
import math

import pytest

from eval.grids import load_grid, merge_seeds, robustness_grid, slider_grids
from eval.methods import read_methods


def test_seeds_make_one_method_per_seed_in_one_group(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"train": {"max_train_steps": 10}, "seeds": [0, 3],
                                "methods": [{"id": "a", "name": "A", "adapter": "lora"}]}))  # fmt: skip
    _, methods = read_methods(str(path))
    assert [(m.id, m.group, m.options["seed"]) for m in methods] == [("a.s0", "a", 0), ("a.s3", "a", 3)]
    path.write_text(json.dumps({"seeds": [1, 1], "methods": [{"name": "A"}]}))
    with pytest.raises(ValueError, match="duplicate seeds"):
        read_methods(str(path))


def test_merge_seeds_folds_seeds_into_the_subject_axis(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(
        json.dumps({"seeds": [0, 1], "methods": [{"id": "a", "name": "A"}, {"id": "b", "name": "B"}]})
    )
    _, methods = read_methods(str(path))
    reports = {(s, m.id): {"unit": (s, m.id)} for s in ("x", "y") for m in methods}
    merged_methods, units, merged = merge_seeds(methods, ["x", "y"], reports)
    assert [(m.id, m.name) for m in merged_methods] == [("a", "A"), ("b", "B")]
    assert "seed" not in merged_methods[0].options
    assert units == ["x@seed0", "x@seed1", "y@seed0", "y@seed1"]
    assert merged[("y@seed1", "b")] == {"unit": ("y", "b.s1")}
    plain, subjects, same = merge_seeds(methods[:0], ["x"], {})  # no seeds: unchanged
    assert plain == [] and subjects == ["x"] and same == {}


def test_table3_micro_scales_the_papers_bounds_as_its_data_states():
    grid = load_grid("table3-micro")
    _, methods = read_methods("table3-micro")
    assert len(methods) == 2 * len(grid["methods"]) and {m.options["seed"] for m in methods} == {0, 1}
    sc = grid["scaling"]
    for p, paper in sc["paper_deltas"].items():
        factor = 1.0 if p == "inf" else (sc["rank"] / sc["paper_rank"]) ** (1 / float(p))
        got = sorted(m["norm_bound"] for m in grid["methods"] if m.get("norm_p") == p)
        assert got == pytest.approx(sorted(sc["c"] * d * factor for d in paper), abs=0.006)
    assert {m.get("rank", grid["train"]["rank"]) for m in grid["methods"]} == {sc["rank"]}
    for p, (sweep, deltas) in slider_grids(grid).items():
        (method,) = sweep["methods"]
        assert method["norm_p"] == p and method["norm_bound"] > max(deltas) and len(deltas) == 3
    rob = robustness_grid(grid)["methods"]
    lrs = [m["learning_rate"] for m in rob if m["id"].startswith("lora_r8_lr")]
    assert math.isclose(max(lrs) / min(lrs), 30.0) and {m.get("rank") for m in rob} >= {4, 16}
