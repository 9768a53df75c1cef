"""Report files: JSON, CSV, a Markdown table and PNG plots, each written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from nblora_diffusion.fileio import atomic_path

NAMES = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "lpips_div": "LPIPS-div",
    "lpips_ref": "LPIPS-ref",
    "subject": "subject",
    "subject_acc": "subject-acc",
    "prompt": "prompt",
    "diversity": "diversity",
    "drift": "drift",
}


def _atomic(path: Path, write: Callable[[str], None]) -> Path:
    with atomic_path(path) as tmp:
        write(str(tmp))
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats get 4 decimals."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def save_figure(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    try:
        return _atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)


def figure(width: float = 5.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def curves_plot(
    path: str | os.PathLike,
    metric: str,
    series: dict[str, list[tuple[int, float]]],
    reference: float | None = None,
    xlabel: str = "training step",
) -> Path:
    """One metric vs training step (or ``xlabel``), one line per series; the real-images value dashed."""
    fig, ax = figure()
    for label, points in series.items():
        points = sorted((s, v) for s, v in points if s is not None and not math.isnan(v))
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
    if reference is not None and not math.isnan(reference):
        ax.axhline(reference, color="grey", linestyle="--", label="real images")
    from matplotlib.ticker import MaxNLocator

    if xlabel == "training step":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(NAMES.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
