"""What the example scripts share: the one-line error for a bad count flag, a torch thread count for the run,
and their results files (the JSON, a matplotlib figure). Imported as a sibling module (the examples are
scripts: Python puts their folder on the path)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch


def require_positive(**flags: int | None) -> None:
    """``error: --flag must be >= 1, got N`` and exit status 2 (no traceback) for the first flag below 1;
    a flag left at None (its default is chosen later) passes."""
    for flag, value in flags.items():
        if value is not None and value < 1:
            print(f"error: --{flag} must be >= 1, got {value}", file=sys.stderr)
            raise SystemExit(2)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch runs on ``n`` threads inside (tiny models run fastest on one), on as many as before after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_results(results: dict, out: Path, name: str) -> Path:
    """``out/<name>.json``: the results, indented, with a final newline."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """``fig`` laid out tight, written to ``path`` at 90 dpi, then closed."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
