"""The benchmark report: Table-3-style rows (mean ± std over subjects), trade-off plot, curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from nblora_diffusion.metrics import (
    ALL_METRICS,
    PairStat,
    Protocol,
    fidelity_metrics,
    get_protocol,
    mean_std,
    pooled_mean,
    select_best_per_prompt,
)

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
            if r["step"] is not None and r.get("delta_prime") is None  # slider rows: method_sweep
        }
    common = set.intersection(*(set(v) for v in by_subject.values())) if by_subject else set()
    return {step: aggregate({s: by_subject[s][step] for s in subjects}, metrics) for step in sorted(common)}


def method_sweep(method: Method, subjects: Sequence[str], reports: dict, metrics: Sequence[str]) -> dict:
    """δ' -> aggregated metrics of the method's final adapter along the slider (every subject has it)."""
    by_subject = {
        s: {
            r["delta_prime"]: {m: PairStat.from_dict(v) for m, v in r["metrics"].items()}
            for r in reports[(s, method.id)]["checkpoints"]
            if r.get("delta_prime") is not None
        }
        for s in subjects
    }
    common = set.intersection(*(set(v) for v in by_subject.values())) if by_subject else set()
    return {d: aggregate({s: by_subject[s][d] for s in subjects}, metrics) for d in sorted(common)}


def method_black(method: Method, subjects: Sequence[str], reports: dict) -> dict[str, int]:
    """step -> all-black images left out of the scores, summed over subjects (protocols with skip_black;
    empty otherwise)."""
    out: dict[str, int] = {}
    for s in subjects:
        for r in reports[(s, method.id)]["checkpoints"]:
            if "black_images" in r and r["step"] is not None and r.get("delta_prime") is None:
                out[str(r["step"])] = out.get(str(r["step"]), 0) + r["black_images"]
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def best_per_prompt(method: Method, subjects: Sequence[str], reports: dict) -> dict | None:
    """HRA's selection over every (subject, prompt) unit -> metric -> {mean, std over units}."""
    units = []
    for s in subjects:
        rows = [
            r
            for r in reports[(s, method.id)]["checkpoints"]
            if r["step"] is not None and r.get("delta_prime") is None
        ]
        if not rows or any("per_prompt" not in r for r in rows):
            return None
        n = len(next(iter(rows[0]["per_prompt"].values())))
        drift = {r["step"]: r["metrics"].get("drift") for r in rows}
        for k in range(n):
            units.append(
                {
                    r["step"]: {
                        **{m: PairStat.from_dict(v[k]).mean for m, v in r["per_prompt"].items()},
                        **({"drift": PairStat.from_dict(drift[r["step"]]).mean} if drift[r["step"]] else {}),
                    }
                    for r in rows
                }
            )
    chosen_metrics = list(next(iter(reports[(subjects[0], method.id)]["checkpoints"]))["per_prompt"])
    steps, means = select_best_per_prompt(units, chosen_metrics)
    out = {}
    for m, mean in means.items():
        vals = [u[st][m] for u, st in zip(units, steps, strict=True) if m in u[st]]
        out[m] = {"mean": mean, "std": mean_std(vals)[1], "pooled": mean, "pairs": len(vals)}
    return {"steps": steps, "stats": out}


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
    protocol: Protocol | None = None,
) -> dict[str, Path]:
    protocol = protocol or get_protocol("default")
    metrics = [m for m in ALL_METRICS if m in metrics]
    fid, text = fidelity_metrics(metrics)  # DINO and CLIP-T, or their micro-world analogues
    results: dict = {
        "subjects": list(subjects),
        "metrics": metrics,
        "methods": [],
        "real": {},
        "fidelity": fid,
        "text": text,
        "protocol": protocol.describe(),
    }
    rows: list[dict] = []

    def add_row(method_id: str, label: str, kind: str, step, stats: dict) -> None:
        row = {"method_id": method_id, "method": label, "row": kind, "step": step}
        for m in metrics:
            row[protocol.column(m, NAMES[m])] = _cell(stats, m)
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
        entry = {
            "id": method.id,
            "name": method.name,
            "best_dino_step": best,
            "steps": {str(k): v for k, v in steps.items()},
            "options": {k: method.options.get(k) for k in ("adapter", "norm_p", "norm_bound")},
        }
        if black := method_black(method, subjects, reports):
            entry["black_images"] = black
        sweep = method_sweep(method, subjects, reports, metrics)
        if sweep:
            entry["sweep"] = {f"{d:g}": v for d, v in sweep.items()}
        if protocol.selection == "best_per_prompt" and (hra := best_per_prompt(method, subjects, reports)):
            entry["best_per_prompt_steps"] = hra["steps"]
            add_row(method.id, method.name, "best step per prompt", None, hra["stats"])
        elif protocol.selection == "best_dino" and best is not None:
            add_row(method.id, method.name, f"best {NAMES[fid]}", best, steps[best])
        results["methods"].append(entry)
        for k in fixed:
            add_row(method.id, method.name, f"step {k}", k, steps.get(k, {}))
        for d, stats in sweep.items():
            add_row(method.id, method.name, f"δ'={d:g} (slider)", max(steps) if steps else None, stats)
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
        *((protocol.column(m, NAMES[m]),) * 2 for m in metrics),
    ]
    table = header + markdown_table(rows, columns)
    black = [(x["name"], x["black_images"]) for x in results["methods"] if "black_images" in x]
    if black:
        table += "\nAll-black (safety-checker) images left out of the scores, per step over subjects:\n\n"
        table += "".join(
            f"- {name}: {', '.join(f'step {k}: {n}' for k, n in counts.items())}\n" for name, counts in black
        )
    paths["md"] = write_text(out / "table.md", table)
    for m in metrics:
        series = {
            x["name"]: [(int(k), v[m]["mean"]) for k, v in x["steps"].items()] for x in results["methods"]
        }
        paths[f"curve_{m}"] = curves_plot(out / "curves" / f"{m}.png", m, series, real[m]["mean"])
    if fid and text:
        paths["tradeoff"] = tradeoff_plot(out / f"tradeoff_{fid}_{text}.png", results)
    if any("sweep" in x for x in results["methods"]) and fid and text:
        paths["sweep"] = sweep_plot(out / f"sweep_{fid}_{text}.png", results)
    if "drift" in metrics and any(delta_points(x, "drift") for x in results["methods"]):
        paths["drift"] = drift_plot(out / "drift_vs_delta.png", results)
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


def _trained_delta(x: dict) -> float | None:
    opts = x.get("options", {})
    return float(opts["norm_bound"]) if opts.get("adapter") == "nblora" and opts.get("norm_bound") else None


def delta_points(x: dict, metric: str) -> dict[str, list[tuple[float, float]]]:
    """A method's (δ, value) points: its final step at its trained δ, and its slider sweep at δ'."""
    out: dict[str, list[tuple[float, float]]] = {}
    d = _trained_delta(x)
    if d is not None and x["steps"]:
        last = x["steps"][str(max(int(k) for k in x["steps"]))]
        if metric in last:
            out["trained"] = [(d, last[metric]["mean"])]
    if "sweep" in x:
        out["sweep"] = sorted((float(k), v[metric]["mean"]) for k, v in x["sweep"].items() if metric in v)
    return out


def drift_plot(path: Path, results: dict) -> Path:
    """Drift (forgetting) vs the bound: trained δ (one point per method, by p) and slider sweeps δ'."""
    fig, ax = figure(5.5, 4.0)
    trained: dict[str, list] = {}
    for x in results["methods"]:
        pts = delta_points(x, "drift")
        if "sweep" in pts:
            ax.plot(
                *zip(*pts["sweep"], strict=True), marker="o", markersize=3, label=f"{x['name']}, slider δ'"
            )
        if "trained" in pts:
            trained.setdefault(f"p={x['options'].get('norm_p')}", []).extend(pts["trained"])
    for label, pts in trained.items():
        pts.sort()
        ax.plot(
            *zip(*pts, strict=True), marker="*", markersize=10, linestyle="--", label=f"trained at δ, {label}"
        )
    ax.set_xlabel("bound δ (trained) or δ' (slider)")
    ax.set_ylabel("drift (1 − mean DINO cosine to the base model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def sweep_plot(path: Path, results: dict) -> Path:
    """The slider's trade-off curve (one adapter scaled to δ') beside the adapters trained at δ'."""
    fid, text = results["fidelity"], results["text"]
    fig, ax = figure(5.5, 4.0)
    for x in results["methods"]:
        if "sweep" in x:
            pts = sorted((float(k), v[text]["mean"], v[fid]["mean"]) for k, v in x["sweep"].items())
            line = ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", markersize=3,
                           label=f"{x['name']} slider δ'")[0]  # fmt: skip
            for d, t, f in pts:
                ax.annotate(f"{d:g}", (t, f), fontsize=5, color=line.get_color())
    sweeps = {float(k) for x in results["methods"] for k in x.get("sweep", {})}
    for x in results["methods"]:
        d = _trained_delta(x)
        if d is not None and d in sweeps and x["steps"]:
            last = x["steps"][str(max(int(k) for k in x["steps"]))]
            ax.plot(last[text]["mean"], last[fid]["mean"], marker="*", markersize=11, linestyle="none",
                    label=f"{x['name']} (trained)")  # fmt: skip
    ax.set_xlabel(f"{NAMES[text]} (prompt fidelity)")
    ax.set_ylabel(f"{NAMES[fid]} (subject fidelity)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, path)
