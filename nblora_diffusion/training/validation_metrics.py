"""Metrics while training: the evaluation suite's metrics at each validation step, and the best step.

``--validation_metrics dino,clip_t,drift`` scores the validation images against the instance photos
with ``nblora_diffusion.metrics`` (the same code as ``python -m eval``): DINO / CLIP-I / LPIPS-ref of
every image vs every photo, CLIP-T of each image with the validation prompt (rare token removed when it
can be told: the instance prompt's words that the class prompt lacks), LPIPS-div among the images, and
drift (PEFT's 1 − mean DINO cosine to the base model's images of PEFT's 10 drift prompts, same seeds).
The base model's images are made once, before the adapters exist, and give the step-0 row, which
``--best_constraint "clip_t>=base-0.01"`` refers to as ``base``.

Rows go to ``validation_metrics.csv`` (and TensorBoard as ``val/<metric>``); ``best_checkpoint.json``
names the step with the best ``--best_metric`` among the steps that meet the constraint (and its
checkpoint folder when one was saved at that step: set --checkpointing_steps to --validation_steps).
The metric models load once; ``--validation_metrics_offload`` moves them to the CPU between validations.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path

from ..fileio import atomic_write_json
from ..metrics import METRICS, MetricConfig, MetricSuite, strip_token
from ..metrics.protocols import PEFT_DRIFT_PROMPTS
from .sampling import generate

log = logging.getLogger(__name__)

VALIDATION_CSV = "validation_metrics.csv"
BEST_FILE = "best_checkpoint.json"
LOWER_IS_BETTER = ("drift",)  # every other metric: higher is better (LPIPS-div: more diverse)
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONSTRAINT = re.compile(r"^\s*(\w+)\s*(>=|<=|>|<)\s*(base|[-+.\deE]+)\s*(?:([-+])\s*([.\deE]+))?\s*$")


def parse_metrics(text: str | None) -> tuple[str, ...]:
    names = tuple(m.strip() for m in (text or "").split(",") if m.strip())
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise ValueError(f"--validation_metrics must be a subset of {','.join(METRICS)}, got {unknown}")
    return names


@dataclass(frozen=True)
class Constraint:
    """``metric op rhs``: rhs a number, or ``base`` (the base model's value) plus or minus a number."""

    metric: str
    op: str
    base: bool
    value: float

    @classmethod
    def parse(cls, text: str) -> Constraint:
        m = _CONSTRAINT.match(text)
        if not m:
            raise ValueError(
                f'--best_constraint must read like "clip_t>=base-0.01" or "drift<0.2", got {text!r}'
            )
        metric, op, rhs, sign, offset = m.groups()
        try:
            value = 0.0 if rhs == "base" else float(rhs)
            if offset:
                value += float(offset) if sign == "+" else -float(offset)
        except ValueError:
            raise ValueError(f"--best_constraint: bad number in {text!r}") from None
        return cls(metric, op, rhs == "base", value)

    def holds(self, row: dict[str, float], base: dict[str, float]) -> bool:
        rhs = self.value + (base[self.metric] if self.base else 0.0)
        return _OPS[self.op](row[self.metric], rhs)


def check_options(config) -> None:
    """Validate the metric options of a TrainConfig (called from its __post_init__)."""
    metrics = parse_metrics(config.validation_metrics)
    if metrics and not config.validation_prompt:
        raise ValueError("--validation_metrics needs --validation_prompt")
    if config.best_metric and config.best_metric not in metrics:
        raise ValueError(f"--best_metric {config.best_metric} must be one of --validation_metrics {metrics}")
    if config.best_constraint:
        if not config.best_metric:
            raise ValueError("--best_constraint needs --best_metric")
        c = Constraint.parse(config.best_constraint)
        if c.metric not in metrics:
            raise ValueError(
                f"--best_constraint metric {c.metric} must be one of --validation_metrics {metrics}"
            )


def token_and_noun(instance_prompt: str, class_prompt: str | None) -> tuple[str | None, str]:
    """The rare token (instance-prompt words the class prompt lacks) and the class noun (last word)."""
    words = instance_prompt.split()
    if class_prompt:
        extra = [w for w in words if w not in class_prompt.split()]
        return (extra[0] if len(extra) == 1 else None), class_prompt.split()[-1]
    return None, words[-1]


class ValidationMetrics:
    """The suite, the base model's images and the rows so far, for one training run."""

    def __init__(self, config, output_dir: Path, photos: list[Path], resolution: int, sdxl: bool) -> None:
        self.config, self.output_dir, self.photos = config, output_dir, photos
        self.resolution, self.sdxl = resolution, sdxl
        self.metrics = parse_metrics(config.validation_metrics)
        overrides = {}
        if config.validation_metric_config:
            try:
                overrides = json.loads(Path(config.validation_metric_config).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(
                    f"--validation_metric_config: cannot read {config.validation_metric_config}: {e}"
                ) from None
        try:
            self.suite = MetricSuite(MetricConfig(**{**overrides, "metrics": self.metrics}))
        except TypeError as e:
            raise ValueError(f"--validation_metric_config: {e}") from None
        token, noun = token_and_noun(config.instance_prompt, config.class_prompt)
        self.text = strip_token(config.validation_prompt, token) if token else config.validation_prompt
        self.drift_prompts = [p.format(class_noun=noun) for p in PEFT_DRIFT_PROMPTS]
        self.best = Constraint.parse(config.best_constraint) if config.best_constraint else None
        self.rows: list[dict[str, float]] = []
        self.base: dict[str, float] = {}
        self._drift_base: list = []

    @classmethod
    def prepare(cls, config, pipe, output_dir: Path, photos, resolution: int, sdxl: bool):
        """None without --validation_metrics; else the suite loaded and the base model's row (step 0),
        made before the adapters are added (PiSSA changes the base weights; scale 0 would not undo it)."""
        if not parse_metrics(config.validation_metrics):
            return None
        self = cls(config, output_dir, [p.path for p in photos], resolution, sdxl)
        self.suite.load()
        images = self._images(pipe, config.validation_prompt)
        if "drift" in self.metrics:
            self._drift_base = [im for p in self.drift_prompts for im in self._images(pipe, p)]
        self.base = self._score(pipe, images, base=True)
        self._offload()
        return self

    def _images(self, pipe, prompt: str) -> list:
        c = self.config
        n = c.num_validation_images
        return generate(
            pipe, prompt, n, c.validation_inference_steps, self.resolution, c.seed or 0, n, self.sdxl
        )

    def _score(self, pipe, images, base: bool = False) -> dict[str, float]:
        stats = self.suite.score(self.photos, [images], [self.text])
        row = {m: s.mean for m, s in stats.items()}
        if "drift" in self.metrics:
            adapted = (
                self._drift_base if base else [im for p in self.drift_prompts for im in self._images(pipe, p)]
            )
            row["drift"] = self.suite.drift(self._drift_base, adapted).mean
        return {m: row[m] for m in self.metrics}

    def _offload(self) -> None:
        if self.config.validation_metrics_offload:
            self._move("cpu")

    def _move(self, device: str) -> None:
        import torch

        for ex in (self.suite._dino, self.suite._clip, self.suite._lpips):
            if ex is not None:
                ex.model.to(device)
                ex.device = torch.device(device)

    def evaluate(self, step: int, pipe, images, accelerator) -> dict[str, float]:
        """Score one validation step's images, log the row, rewrite best_checkpoint.json."""
        if self.config.validation_metrics_offload:
            self._move(str(accelerator.device))
        try:
            row = self._score(pipe, images)
        finally:
            self._offload()
        if not self.rows:  # first validation of this process: the base row, and a resumed run's rows
            self._start(step)
        self.rows.append({"step": step, **row})
        self._write_row(step, row)
        accelerator.log({f"val/{m}": v for m, v in row.items()}, step=step)
        self._write_best()
        return row

    def _start(self, step: int) -> None:
        path = self.output_dir / VALIDATION_CSV
        kept = [r for r in _rows_before(path, step) if int(r["step"]) > 0]
        self.rows = [{"step": int(r["step"]), **{m: float(r[m]) for m in self.metrics}} for r in kept]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", *self.metrics])
            w.writeheader()
            w.writerow({"step": 0, **{m: f"{v:.6g}" for m, v in self.base.items()}})
            w.writerows(kept)

    def _write_row(self, step: int, row: dict[str, float]) -> None:
        with (self.output_dir / VALIDATION_CSV).open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=["step", *self.metrics]).writerow(
                {"step": step, **{m: f"{v:.6g}" for m, v in row.items()}}
            )

    def _write_best(self) -> None:
        metric = self.config.best_metric
        if not metric:
            return
        ok = [r for r in self.rows if self.best is None or self.best.holds(r, self.base)]
        sign = -1 if metric in LOWER_IS_BETTER else 1
        best = max(ok, key=lambda r: (sign * _nan_low(r[metric]), -r["step"])) if ok else None
        ckpt = self.output_dir / f"checkpoint-{best['step']}" if best else None
        atomic_write_json(
            self.output_dir / BEST_FILE,
            {
                "metric": metric,
                "constraint": self.config.best_constraint,
                "base": self.base,
                "step": best["step"] if best else None,
                "value": best[metric] if best else None,
                "metrics": best,
                "checkpoint": str(ckpt) if ckpt is not None and ckpt.is_dir() else None,
                "steps_meeting_constraint": [r["step"] for r in ok],
            },
            indent=2,
        )


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _rows_before(path: Path, step: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) < step]
