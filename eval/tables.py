"""The benchmark report: Table-3-style rows (mean ± std over subjects), trade-off plot, curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from nblora_diffusion.metrics import ALL_METRICS, PairStat, fidelity_metrics, mean_std, pooled_mean

from .methods import Method
from .report import NAMES, curves_plot, figure, markdown_table, save_figure, write_csv, write_json, write_text


def aggregate(per_subject: dict[str, dict[str, PairStat]], metrics: Sequence[str]) -> dict:
    """subject -> metric -> PairStat  =>  metric -> mean of subject means, std over subjects, pooled mean."""
    out = {}
    for m in metrics:
        stats = {s: v[m] for s, v in per_subject.items() if m in v}
        mean, std = mean_std([st.mean for st in stats.values()])
        out[m] = {
            "mean": mean,
            "std": std,
            "pooled": pooled_mean(stats.values()),
            "pairs": sum(st.count for st in stats.values()),
            "per_subject": {s: st.mean for s, st in stats.items()},
        }
    return out


def method_steps(
    method: Method, subjects: Sequence[str], reports: dict, metrics: Sequence[str]
) -> dict[int, dict]:
    """step -> aggregated metrics, over the steps that every subject has."""
    by_subject: dict[str, dict[int, dict[str, PairStat]]] = {}
    for s in subjects:
        rows = reports[(s, method.id)]["checkpoints"]
        by_subject[s] = {
            r["step"]: {m: PairStat.from_dict(v) for m, v in r["metrics"].items()}
            for r in rows
            if r["step"] is not None
        }
    common = set.intersection(*(set(v) for v in by_subject.values())) if by_subject else set()
    return {step: aggregate({s: by_subject[s][step] for s in subjects}, metrics) for step in sorted(common)}


def _cell(stats: dict, m: str) -> str:
    if m not in stats or math.isnan(stats[m]["mean"]):
        return "–"
    return f"{stats[m]['mean']:.4f} ± {stats[m]['std']:.4f}"


def write_benchmark_report(
    out: Path,
    methods: Sequence[Method],
    subjects: Sequence[str],
    reports: dict,
    metrics: Sequence[str],
    report_steps: Sequence[int] | None = None,
) -> dict[str, Path]:
    metrics = [m for m in ALL_METRICS if m in metrics]
    fid, text = fidelity_metrics(metrics)  # DINO and CLIP-T, or their micro-world analogues
    results: dict = {
        "subjects": list(subjects),
        "metrics": metrics,
        "methods": [],
        "real": {},
        "fidelity": fid,
        "text": text,
    }
    rows: list[dict] = []

    def add_row(method_id: str, label: str, kind: str, step, stats: dict) -> None:
        row = {"method_id": method_id, "method": label, "row": kind, "step": step}
        for m in metrics:
            row[NAMES[m]] = _cell(stats, m)
            row.update(
                {
                    f"{m}_mean": stats.get(m, {}).get("mean"),
                    f"{m}_std": stats.get(m, {}).get("std"),
                    f"{m}_pooled": stats.get(m, {}).get("pooled"),
                }
            )
        rows.append(row)

    for method in methods:
        steps = method_steps(method, subjects, reports, metrics)
        best = max(steps, key=lambda k: (steps[k][fid]["mean"], -k)) if steps and fid else None
        fixed = [k for k in (report_steps or ([max(steps)] if steps else []))]
        results["methods"].append(
            {
                "id": method.id,
                "name": method.name,
                "best_dino_step": best,
                "steps": {str(k): v for k, v in steps.items()},
            }
        )
        if best is not None:
            add_row(method.id, method.name, f"best {NAMES[fid]}", best, steps[best])
        for k in fixed:
            add_row(method.id, method.name, f"step {k}", k, steps.get(k, {}))
    real = aggregate(
        {
            s: {m: PairStat.from_dict(v) for m, v in reports[(s, methods[0].id)]["real"].items()}
            for s in subjects
        },
        metrics,
    )
    results["real"] = real
    add_row("real", "real images", "i ≠ j", None, real)
    results["table"] = rows

    paths = {
        "csv": write_csv(
            out / "table.csv",
            rows,
            [
                "method_id",
                "method",
                "row",
                "step",
                *(f"{m}_{k}" for m in metrics for k in ("mean", "std", "pooled")),
            ],
        )
    }
    header = (
        f"# DreamBooth benchmark: {len(subjects)} subject(s) × {len(methods)} method(s)\n\n"
        "Mean of per-subject means ± std over subjects (pooled means over all pairs in table.csv).\n\n"
    )
    columns = [
        ("method", "method"),
        ("row", "row"),
        ("step", "step"),
        *((NAMES[m], NAMES[m]) for m in metrics),
    ]
    paths["md"] = write_text(out / "table.md", header + markdown_table(rows, columns))
    for m in metrics:
        series = {
            x["name"]: [(int(k), v[m]["mean"]) for k, v in x["steps"].items()] for x in results["methods"]
        }
        paths[f"curve_{m}"] = curves_plot(out / "curves" / f"{m}.png", m, series, real[m]["mean"])
    if fid and text:
        paths["tradeoff"] = tradeoff_plot(out / f"tradeoff_{fid}_{text}.png", results)
    paths["json"] = write_json(out / "results.json", results)
    return paths


def tradeoff_plot(path: Path, results: dict) -> Path:
    """DINO (subject fidelity) vs CLIP-T (prompt fidelity), one line per method through its steps (or
    their micro-world analogues)."""
    fid, text = results.get("fidelity", "dino"), results.get("text", "clip_t")
    fig, ax = figure(5.5, 4.0)
    for x in results["methods"]:
        pts = sorted((int(k), v[text]["mean"], v[fid]["mean"]) for k, v in x["steps"].items())
        if not pts:
            continue
        line = ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", markersize=3, label=x["name"])[0]
        if x["best_dino_step"] is not None:
            best = x["steps"][str(x["best_dino_step"])]
            ax.plot(
                best[text]["mean"],
                best[fid]["mean"],
                marker="*",
                markersize=11,
                color=line.get_color(),
            )
    ax.axhline(
        results["real"][fid]["mean"], color="grey", linestyle="--", label=f"real images ({NAMES[fid]})"
    )
    ax.set_xlabel(f"{NAMES[text]} (prompt fidelity)")
    ax.set_ylabel(f"{NAMES[fid]} (subject fidelity)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, path)
