"""Table 3 in miniature: the paper's DreamBooth trade-off measured end to end on the micro world.

    python examples/table3_mini.py            # full mode: 39.5 min on 2 CPU cores (README)
    python examples/table3_mini.py --quick    # 1 subject, 2 methods, 100 steps: about a minute

Builds ``python -m eval benchmark`` invocations from the ``table3-micro`` grid (eval/table3_micro.json):
  1. the table: LoRA/DoRA/PiSSA, the two baselines and NB-LoRA p = 1, 2, ∞ × 3 δ, 6 subjects × 2 seeds;
  2. the slider: one NB-LoRA adapter per (p, subject) at a generous δ, scored at the table's δ;
  3. robustness: LoRA and NB-LoRA p=∞ δ=2 at learning rate ×0.3 … ×9 and rank 4, 16.
Each benchmark runs ``--jobs`` shard processes (one thread each) and resumes where it stopped. Writes
results.json/.csv/.md and the plots into --out; the training runs stay in --out/work (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.grids import load_grid, quick_grid, robustness_grid, slider_grids  # noqa: E402
from eval.report import figure, markdown_table, save_figure, write_csv, write_json, write_text  # noqa: E402

METRICS = "subject,subject_acc,prompt,diversity"  # drift left out: it doubles the scoring time
# images per checkpoint: prompts × images; DPM-Solver++ steps (README: sizing)
SCORING = {"max_prompts": 4, "images_per_prompt": 4, "num_inference_steps": 10, "guidance_scale": 5}
QUICK = {"small": 0.25, "large": 3.6, "steps": 100}  # p=∞ δ, as a tight bound and the grid's largest


def benchmark(
    out: Path, methods: dict, base_model: str, subjects: str, jobs: int, sweep: list[float] | None = None
) -> float:
    """Run one benchmark with ``jobs`` shard processes, then its report; returns the wall time (s)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "methods.json"
    spec.write_text(json.dumps(methods, ensure_ascii=False, indent=1), encoding="utf-8")
    args = [sys.executable, "-m", "eval", "benchmark", "--dataset", str(ROOT / "assets" / "microworld"),
            "--base_model", base_model, "--methods", str(spec), "--subjects", subjects, "--out", str(out),
            "--metrics", METRICS, "--no_save_images"]  # fmt: skip
    for key, value in SCORING.items():
        args += [f"--{key}", str(value)]
    if sweep:
        args += ["--sweep_delta", ",".join(f"{d:g}" for d in sweep)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    if jobs == 1:  # in this process: no second start-up of torch and diffusers
        from eval.cli import main as eval_main

        if eval_main(args[3:]):
            raise SystemExit(f"benchmark in {out} failed (see the messages above); re-run to resume")
    else:
        procs = [
            subprocess.Popen([*args, "--shard", f"{i}/{jobs}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
            for i in range(jobs)
        ]
        if any(p.wait() for p in procs):
            raise SystemExit(f"benchmark in {out} failed (see the messages above); re-run to resume")
    if not (out / "report" / "results.json").is_file():  # the last shard to finish writes it
        raise SystemExit(f"benchmark in {out} has unfinished units; re-run to resume")
    return time.perf_counter() - t0


def results_of(out: Path) -> dict:
    return json.loads((out / "report" / "results.json").read_text(encoding="utf-8"))


def final(method: dict) -> dict:
    return method["steps"][str(max(int(k) for k in method["steps"]))]


def best(method: dict) -> dict:
    return method["steps"][str(method["best_dino_step"])]


def summary_row(method: dict, fid: str, text: str, label: str | None = None) -> dict:
    b, last = best(method), final(method)
    return {
        "method": label or method["name"],
        "best_step": method["best_dino_step"],
        **{f"{m}_best": f"{b[m]['mean']:.3f} ± {b[m]['std']:.3f}" for m in (fid, text)},
        **{f"{m}_final": f"{last[m]['mean']:.3f} ± {last[m]['std']:.3f}" for m in (fid, text)},
        **{f"{m}_best_mean": b[m]["mean"] for m in (fid, text)},
        **{f"{m}_best_std": b[m]["std"] for m in (fid, text)},
    }


def slider_plot(path: Path, table: dict, slider: dict[str, dict], fid: str, text: str) -> Path:
    """Per p: the slider's trade-off (one adapter at δ') beside the adapters trained at δ (final step)."""
    fig, ax = figure(5.5, 4.0)
    for p, m in slider.items():
        pts = sorted((float(d), v[text]["mean"], v[fid]["mean"]) for d, v in m.get("sweep", {}).items())
        line = ax.plot([x[1] for x in pts], [x[2] for x in pts], marker="o", markersize=3,
                       label=f"{m['name']} slider δ'")[0]  # fmt: skip
        for d, t, f in pts:
            ax.annotate(f"{d:g}", (t, f), fontsize=5, color=line.get_color())
        trained = [
            x
            for x in table["methods"]
            if x["options"].get("norm_p") == p and x["options"].get("adapter") == "nblora"
        ]
        ax.plot(
            [final(x)[text]["mean"] for x in trained],
            [final(x)[fid]["mean"] for x in trained],
            marker="*",
            markersize=10,
            linestyle="none",
            color=line.get_color(),
            label=f"p={p} trained at δ",
        )
        for x in trained:
            ax.annotate(
                f"{x['options']['norm_bound']:g}", (final(x)[text]["mean"], final(x)[fid]["mean"]), fontsize=5
            )
    ax.set_xlabel(f"{text} (prompt fidelity)")
    ax.set_ylabel(f"{fid} (subject fidelity)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def robustness_rows(res: dict, fid: str, text: str) -> list[dict]:
    """Per method: final fidelity and prompt fidelity over its lr variants and ranks, with their spread."""
    rows = []
    for group in dict.fromkeys(x["id"].rsplit("_", 1)[0] for x in res["methods"]):
        members = [x for x in res["methods"] if x["id"].rsplit("_", 1)[0] == group]
        for kind, tag in (("learning rate ×0.3…×9", "_lr"), ("rank 4, 16", "_rank")):
            chosen = [x for x in members if tag in x["id"][len(group) :]]
            vals = {m: [final(x)[m]["mean"] for x in chosen] for m in (fid, text)}
            rows.append({
                "method": group, "varied": kind,
                **{f"{m}_values": ", ".join(f"{v:.3f}" for v in vals[m]) for m in (fid, text)},
                **{f"{m}_spread": max(vals[m]) - min(vals[m]) for m in (fid, text)},
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 subject, 2 methods, 100 steps (the test)")
    p.add_argument("--out", default=str(ROOT / "examples" / "results" / "table3_mini"))
    p.add_argument("--work", default=None, help="benchmark folders (default OUT/work)")
    p.add_argument("--base_model", default=None, help="default: the shipped micro SD")
    p.add_argument("--subjects", default="all", help="full mode: comma-separated subset of the 6 subjects")
    p.add_argument("--jobs", type=int, default=None, help="parallel shard processes (default 2, quick 1)")
    p.add_argument(
        "--grid", default="table3-micro", help="preset name or methods file with slider/robustness"
    )
    a = p.parse_args(argv)
    if a.base_model is None:
        from nblora_diffusion.microworld import model_path

        a.base_model = str(model_path())
    out = Path(a.out)
    work = Path(a.work) if a.work else out / "work"
    jobs = a.jobs or (1 if a.quick else 2)
    grid = load_grid(a.grid)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    if a.quick:
        methods = quick_grid(grid, QUICK["small"], QUICK["large"], QUICK["steps"])
        timing["table"] = benchmark(
            work / "quick", methods, a.base_model, "striped_circle", jobs, [QUICK["small"]]
        )
        table, robust = results_of(work / "quick"), None
        slider = {"inf": next(m for m in table["methods"] if "sweep" in m)}  # the large δ at the small
    else:
        timing["table"] = benchmark(work / "table3", grid, a.base_model, a.subjects, jobs)
        table = results_of(work / "table3")
        slider = {}
        for pv, (methods, deltas) in slider_grids(grid).items():
            timing[f"slider_p{pv}"] = benchmark(
                work / f"slider_p{pv}", methods, a.base_model, a.subjects, jobs, deltas
            )
            slider[pv] = results_of(work / f"slider_p{pv}")["methods"][0]
        rob = grid["robustness"]
        names = sorted(d.name for d in (ROOT / "assets" / "microworld").iterdir() if d.is_dir())
        names = names if a.subjects == "all" else a.subjects.split(",")
        subjects = ",".join(names[: rob["subjects"]])
        timing["robustness"] = benchmark(
            work / "robustness", robustness_grid(grid), a.base_model, subjects, jobs
        )
        robust = results_of(work / "robustness")
    timing["total"] = time.perf_counter() - t0
    fid, text = table["fidelity"], table["text"]

    rows = [summary_row(m, fid, text) for m in table["methods"]]
    results = {
        "mode": "quick" if a.quick else "full",
        "base_model": a.base_model,
        "grid": a.grid,
        "scoring": {**SCORING, "metrics": METRICS},
        "jobs": jobs,
        "wall_time_s": timing,
        "fidelity": fid,
        "text": text,
        "subjects": table["subjects"],
        "table": rows,
        "real": {m: table["real"][m]["mean"] for m in (fid, text) if m in table["real"]},
        "methods": table["methods"],
        "slider": slider,
    }
    out.mkdir(parents=True, exist_ok=True)
    cols = [("method", "method"), ("best_step", "best step")] + [
        (f"{m}_{k}", f"{m} ({k})") for k in ("best", "final") for m in (fid, text)
    ]
    md = [
        f"# Table 3 in miniature ({results['mode']} mode)\n",
        f"{len(table['subjects'])} unit(s) (subject × seed): mean ± std over them; best = the step of the "
        f"highest mean {fid}. Wall time {timing['total'] / 60:.1f} min with {jobs} job(s).\n",
        markdown_table(rows, cols),
    ]  # fmt: skip
    if slider:
        srows = [{"p": pv, "delta_prime": d, fid: v[fid]["mean"], text: v[text]["mean"]}
                 for pv, m in results["slider"].items() for d, v in m.get("sweep", {}).items()]  # fmt: skip
        results["slider_rows"] = srows
        scols = [("p", "p"), ("delta_prime", "δ'"), (fid, fid), (text, text)]
        md += [
            "\n## Slider (one adapter per p at a generous δ, scored at δ')\n",
            markdown_table(srows, scols),
        ]
    if robust is not None:
        rrows = robustness_rows(robust, fid, text)
        results["robustness"] = rrows
        md += ["\n## Robustness (final step; spread = max − min)\n",
               markdown_table(rrows, [("method", "method"), ("varied", "varied"), (f"{fid}_values", fid),
                                      (f"{fid}_spread", f"{fid} spread"), (f"{text}_values", text),
                                      (f"{text}_spread", f"{text} spread")])]  # fmt: skip
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows, [k for k in rows[0] if not k.endswith(("_best", "_final"))])
    write_text(out / "results.md", "\n".join(md) + "\n")
    report = work / ("quick" if a.quick else "table3") / "report"
    shutil.copyfile(report / f"tradeoff_{fid}_{text}.png", out / "tradeoff.png")
    for png in (report / "curves").glob("*.png"):
        shutil.copyfile(png, out / f"curve_{png.name}")
    if slider:
        slider_plot(out / "slider.png", table, slider, fid, text)
    print((out / "results.md").read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
