"""Run logs: per-step CSVs (loss, lr, per-layer norm ratio ‖W‖_Sp/δ and σ₁), TensorBoard, plots, grids."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from ..fileio import atomic_path

STEPS_CSV = "train_log.csv"
NORMS_CSV = "norms.csv"
NORM_PLOT = "norm_curves.png"
STEP_FIELDS = ("step", "loss", "lr", "norm_ratio_max", "sigma_max", "elapsed_s")
NORM_FIELDS = ("step", "layer", "norm", "bound", "ratio", "sigma_max")


def _truncate_after(path: Path, fields: tuple[str, ...], step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run replays them), rewriting the file atomically."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


class RunLog:
    """Appends one row per step to train_log.csv and one per layer to norms.csv; mirrors to trackers."""

    def __init__(self, output_dir: Path, accelerator, start_step: int = 0) -> None:
        self.output_dir, self.accelerator = output_dir, accelerator
        self.files = {}
        for name, fields in ((STEPS_CSV, STEP_FIELDS), (NORMS_CSV, NORM_FIELDS)):
            path = output_dir / name
            _truncate_after(path, fields, start_step)
            new = not path.is_file()
            handle = path.open("a", newline="")
            writer = csv.DictWriter(handle, fieldnames=fields)
            if new:
                writer.writeheader()
            self.files[name] = (handle, writer)

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        elapsed_s: float,
        norms: list[tuple[str, float, float, float]] | None,
    ) -> None:
        row = {
            "step": step,
            "loss": f"{loss:.6g}",
            "lr": f"{lr:.6g}",
            "elapsed_s": f"{elapsed_s:.3f}",
            "norm_ratio_max": "",
            "sigma_max": "",
        }
        scalars = {"loss": loss, "lr": lr}
        if norms:
            ratios = [n / b for _, n, b, _ in norms]
            row["norm_ratio_max"] = f"{max(ratios):.6g}"
            row["sigma_max"] = f"{max(s for *_, s in norms):.6g}"
            scalars.update({"norm_ratio/max": max(ratios), "sigma_max/max": max(s for *_, s in norms)})
            handle, writer = self.files[NORMS_CSV]
            for (layer, norm, bound, sigma), ratio in zip(norms, ratios, strict=True):
                writer.writerow(
                    {
                        "step": step,
                        "layer": layer,
                        "norm": f"{norm:.6g}",
                        "bound": f"{bound:.6g}",
                        "ratio": f"{ratio:.6g}",
                        "sigma_max": f"{sigma:.6g}",
                    }
                )
                scalars[f"norm_ratio/{layer}"] = ratio
                scalars[f"sigma_max/{layer}"] = sigma
            handle.flush()
        handle, writer = self.files[STEPS_CSV]
        writer.writerow(row)
        handle.flush()
        self.accelerator.log(scalars, step=step)

    def images(self, step: int, images: list[Image.Image]) -> Path:
        from diffusers.utils import make_image_grid

        grid = make_image_grid(images, rows=1, cols=len(images))
        path = self.output_dir / "validation" / f"step-{step:06d}.png"
        save_image_atomic(grid, path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_images(
                    "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
                )
        return path

    def close(self) -> None:
        for handle, _ in self.files.values():
            handle.close()


def save_image_atomic(image: Image.Image, path: Path) -> None:
    with atomic_path(path, mode=0o644) as tmp:
        image.save(tmp)


def plot_norms(output_dir: Path) -> Path | None:
    """norm_curves.png: ‖W‖_Sp/δ and σ₁ of every layer over the steps (the bound is the line at 1)."""
    path = output_dir / NORMS_CSV
    if not path.is_file():
        return None
    series: dict[str, list[tuple[int, float, float]]] = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            series.setdefault(r["layer"], []).append(
                (int(r["step"]), float(r["ratio"]), float(r["sigma_max"]))
            )
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for rows in series.values():
        steps = [s for s, _, _ in rows]
        ax1.plot(steps, [r for _, r, _ in rows], lw=0.7, alpha=0.6)
        ax2.plot(steps, [s for _, _, s in rows], lw=0.7, alpha=0.6)
    ax1.axhline(1.0, color="k", ls="--", lw=1, label="bound δ")
    ax1.set(
        xlabel="step",
        ylabel=r"$\|W\|_{S_p}\,/\,\delta$",
        title=f"norm ratio per layer ({len(series)} layers)",
    )
    ax1.legend(loc="lower right")
    ax2.set(xlabel="step", ylabel="σ₁(W)", title="largest singular value per layer")
    fig.tight_layout()
    out = output_dir / NORM_PLOT
    try:
        with atomic_path(out, mode=0o644) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out
