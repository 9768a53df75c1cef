"""Method grids with seeds: the report aggregates each method over subjects × seeds.

A methods file with ``"seeds": [0, 1]`` makes one benchmark method per (method, seed) (``methods.py``:
id ``<id>.s<seed>``, ``group`` = ``<id>``). The runner trains and scores them as any other method; for
the report, :func:`merge_seeds` folds the seeds into the subject axis, so every row of the table is one
method, its mean ± std taken over the (subject, seed) units and its best-fidelity step chosen on that
mean — by the report code the benchmark already has (``tables.write_benchmark_report``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .methods import Method


def seed_of(m: Method) -> int | None:
    return m.options.get("seed") if m.group is not None else None


def merge_seeds(
    methods: Sequence[Method], subjects: Sequence[str], reports: dict[tuple[str, str], dict]
) -> tuple[list[Method], list[str], dict[tuple[str, str], dict]]:
    """(methods, subjects, reports) with each group's seeds folded into units ``<subject>@seed<k>``.

    Methods without a group pass through unchanged (a grid without seeds gives back its inputs).
    Every group must have the same seeds, so that every row averages the same units.
    """
    if all(m.group is None for m in methods):
        return list(methods), list(subjects), dict(reports)
    if any(m.group is None for m in methods):
        raise ValueError("a methods file either has 'seeds' for every method or for none")
    groups: dict[str, list[Method]] = {}
    for m in methods:
        groups.setdefault(m.group, []).append(m)
    seeds = {g: tuple(seed_of(m) for m in ms) for g, ms in groups.items()}
    if len(set(seeds.values())) != 1:
        raise ValueError(f"every method needs the same seeds, got {seeds}")
    merged_methods, units, merged = [], None, {}
    for g, ms in groups.items():
        first = ms[0]
        options = {k: v for k, v in first.options.items() if k != "seed"}
        merged_methods.append(Method(g, first.group_name or g, options))
        units = [f"{s}@seed{seed_of(m)}" for s in subjects for m in ms]
        for s in subjects:
            for m in ms:
                merged[(f"{s}@seed{seed_of(m)}", g)] = reports[(s, m.id)]
    return merged_methods, units or [], merged


# -- the grid's other experiments: the slider sweep, robustness, the quick mode (examples/table3_mini.py) --
def load_grid(spec: str) -> dict:
    """The raw methods file of a preset name or a path (its 'slider' and 'robustness' sections too)."""
    import json
    from pathlib import Path

    from .methods import PRESETS, read_methods

    read_methods(spec)  # validates the grid itself
    return json.loads(Path(PRESETS.get(spec, spec)).read_text(encoding="utf-8"))


def _nblora_deltas(grid: dict, p: str) -> list[float]:
    return sorted(
        float(m["norm_bound"]) for m in grid["methods"] if m.get("adapter") == "nblora" and m["norm_p"] == p
    )


def _find(grid: dict, method_id: str) -> dict:
    found = [m for m in grid["methods"] if m.get("id") == method_id]
    if not found:
        raise ValueError(
            f"the grid has no method {method_id!r} (ids: {[m.get('id') for m in grid['methods']]})"
        )
    return found[0]


def slider_grids(grid: dict) -> dict[str, tuple[dict, list[float]]]:
    """p -> (methods file of one NB-LoRA adapter at the generous δ, the δ' to score it at).

    δ' are the δ the main grid trains at for that p, so the slider's points sit beside trained ones.
    """
    slider = grid["slider"]
    out = {}
    for p, delta in slider["delta"].items():
        deltas = _nblora_deltas(grid, p)
        if not deltas:
            raise ValueError(f"slider p={p}: the grid trains no NB-LoRA method at that p")
        base = next(m for m in grid["methods"] if m.get("adapter") == "nblora" and m["norm_p"] == p)
        label = "∞" if p == "inf" else p
        method = {
            **{k: v for k, v in base.items() if k not in ("id", "name")},
            "id": f"nblora_p{p}_d{delta:g}_slider",
            "name": f"NB-LoRA p={label} δ={delta:g}",
            "norm_bound": delta,
        }
        out[p] = ({"train": grid["train"], "seeds": slider["seeds"], "methods": [method]}, deltas)
    return out


def robustness_grid(grid: dict) -> dict:
    """Methods file: each named method at its learning rate × every factor, and at every rank."""
    rob = grid["robustness"]
    methods = []
    for mid in rob["methods"]:
        m = _find(grid, mid)
        own = {k: v for k, v in m.items() if k not in ("id", "name")}
        lr = float(m.get("learning_rate", grid["train"].get("learning_rate", 1e-4)))
        for f in rob["lr_factors"]:
            methods.append({**own, "id": f"{mid}_lr{f:g}x", "name": f"{m['name']} lr×{f:g}",
                            "learning_rate": lr * f})  # fmt: skip
        for r in rob["ranks"]:
            methods.append({**own, "id": f"{mid}_rank{r}", "name": f"{m['name']} rank {r}", "rank": r})
    return {"train": grid["train"], "seeds": rob["seeds"], "methods": methods}


def quick_grid(grid: dict, small: float, large: float, steps: int) -> dict:
    """Two NB-LoRA p=∞ methods at a small and a large δ, ``steps`` steps (checkpoints at half and end)."""
    base = next(m for m in grid["methods"] if m.get("adapter") == "nblora" and m["norm_p"] == "inf")
    own = {k: v for k, v in base.items() if k not in ("id", "name")}
    train = {**grid["train"], "max_train_steps": steps, "checkpointing_steps": max(1, steps // 2)}
    return {
        "train": train,
        "methods": [
            {**own, "id": f"nblora_pinf_d{d:g}", "name": f"NB-LoRA p=∞ δ={d:g}", "norm_bound": d}
            for d in (small, large)
        ],
    }
