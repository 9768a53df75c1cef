"""Scoring adapters of one subject: generate with fixed seeds, embed, score, write the report.

Per checkpoint, the numbers are cached in OUT/scores/<run>/<checkpoint>.json with a fingerprint of
every setting and of the adapter files, so an interrupted scoring run continues where it stopped and a
changed setting or checkpoint is scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from nblora_diffusion.metrics import (
    ALL_METRICS,
    MetricConfig,
    MicroWorldConfig,
    PairStat,
    Protocol,
    drift_score,
    get_protocol,
    make_suite,
    select_best_per_prompt,
    strip_token,
)
from nblora_diffusion.metrics.protocols import drop_black, drop_black_pairs

from . import checkpoints
from .report import NAMES, curves_plot, markdown_table, read_json, write_csv, write_json, write_text


@dataclass(frozen=True)
class GenerationConfig:
    images_per_prompt: int = 4
    seed: int = 0  # image j of prompt i uses seed + i·images_per_prompt + j, for every checkpoint and method
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the model's native size
    batch_size: int = 8  # images per pipeline call
    dtype: str = "fp32"
    base_model_config: str | None = None  # a single-file base model's configs (None: inferred)
    allow_ckpt: bool = False  # a pickled .ckpt base model, read weights-only
    device: str | None = None  # None: cuda when present
    save_images: bool = True

    def __post_init__(self) -> None:
        for name in ("images_per_prompt", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")

    def describe(self) -> dict:
        d = asdict(self)
        for key in ("batch_size", "device", "save_images", "allow_ckpt"):  # not protocol: same images
            d.pop(key)
        if d["base_model_config"] is None:  # the default: fingerprints of earlier reports stay valid
            d.pop("base_model_config")
        return d


def image_seeds(seed: int, num_prompts: int, per_prompt: int) -> list[list[int]]:
    return [[seed + i * per_prompt + j for j in range(per_prompt)] for i in range(num_prompts)]


def generate(
    pipe, prompts: list[str], gen: GenerationConfig, desc: str = "generating"
) -> list[list[Image.Image]]:
    """``gen.images_per_prompt`` images per prompt, image (i, j) from its own seeded CPU generator so the
    noise is the same on every device and for every checkpoint."""
    k = gen.images_per_prompt
    seeds = image_seeds(gen.seed, len(prompts), k)
    per_call = max(1, gen.batch_size // k)
    size = {"height": gen.resolution, "width": gen.resolution} if gen.resolution else {}
    groups: list[list[Image.Image]] = []
    for start in tqdm(range(0, len(prompts), per_call), desc=desc, leave=False, unit="batch"):
        chunk = prompts[start : start + per_call]
        generators = [
            torch.Generator("cpu").manual_seed(s) for i in range(start, start + len(chunk)) for s in seeds[i]
        ]
        images = pipe(
            prompt=chunk,
            num_images_per_prompt=k,
            generator=generators,
            output_type="pil",
            num_inference_steps=gen.num_inference_steps,
            guidance_scale=gen.guidance_scale,
            **size,
        ).images
        groups += [images[i * k : (i + 1) * k] for i in range(len(chunk))]
    return groups


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Scorer:
    """A base pipeline and the metric models, loaded once and reused for every adapter and subject."""

    def __init__(
        self,
        base_model: str,
        metrics: MetricConfig | MicroWorldConfig | None = None,
        gen: GenerationConfig | None = None,
        allow_other_base: bool = False,
        protocol: Protocol | None = None,
    ) -> None:
        self.base_model = str(base_model)
        self.protocol = protocol or get_protocol("default")
        self.gen = gen or GenerationConfig()
        self.allow_other_base = allow_other_base
        self.suite = make_suite(metrics)
        self._pipe = None

    @property
    def _per_prompt(self) -> bool:
        """Per-prompt numbers are kept for HRA's best-step-per-prompt selection (DINO/CLIP suite)."""
        return self.protocol.selection == "best_per_prompt" and hasattr(self.suite, "score_groups")

    @property
    def pipe(self):
        if self._pipe is None:
            from nblora_diffusion import diffusion

            self._pipe = diffusion.load_pipeline(
                self.base_model,
                dtype=self.gen.dtype,
                device=self.gen.device,  # None: cuda when present
                config=self.gen.base_model_config,
                allow_ckpt=self.gen.allow_ckpt,
            )
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    def load(self) -> Scorer:
        """Load the metric models and the pipeline now, so a missing model fails before any work."""
        self.suite.load()
        _ = self.pipe
        return self

    def check(self, refs: list[checkpoints.AdapterRef]) -> None:
        if not self.allow_other_base:
            for ref in refs:
                checkpoints.check_base_model(ref, self.base_model)

    def score_subject(
        self,
        refs: list[checkpoints.AdapterRef],
        real: list[Path],
        prompts: list[str],
        texts: list[str],
        out: str | os.PathLike,
        info: dict | None = None,
        progress: bool = True,
        plots: bool = True,
        drift_texts: list[str] | None = None,
    ) -> dict:
        """Score every adapter in ``refs`` on one subject and write the report into ``out``.

        ``prompts`` are the generation prompts (with the token), ``texts`` what CLIP-T compares with,
        ``drift_texts`` the prompts drift is measured on (default: ``texts``).
        """
        self.check(refs)
        out = Path(out)
        drift_texts = list(texts if drift_texts is None else drift_texts)
        settings = {
            "metrics": self.suite.config.describe(),
            "generation": self.gen.describe(),
            "prompts": prompts,
            "clip_t_texts": texts,
            "base_model": self.base_model,
            "real_images": [(p.name, p.stat().st_size) for p in real],
            **({"drift_texts": drift_texts} if drift_texts != list(texts) else {}),
            **({"skip_black": True} if self.protocol.skip_black else {}),
        }
        key = _fingerprint(settings)
        rows = []
        for ref in tqdm(
            refs,
            desc=f"scoring {info.get('subject', '') if info else ''}".strip(),
            unit="ckpt",
            disable=not progress,
        ):
            rows.append(self._score_one(ref, real, prompts, texts, drift_texts, out, key))
        checkpoints.clear(self.pipe)
        real_row = self.suite.reference(real, texts)
        report = {
            **(info or {}),
            "settings": settings,
            "protocol": self.protocol.describe(),
            "metrics": list(self.suite.config.metrics),
            "real": {m: s.to_dict() for m, s in real_row.items()},
            "checkpoints": rows,
        }
        write_score_report(report, out, plots=plots)
        return report

    def _drift_base(self, texts: list[str]) -> list:
        """Base-model images of the token-free prompts (once per prompt list)."""
        key = tuple(texts)
        if getattr(self, "_drift_key", None) != key:
            checkpoints.clear(self.pipe)
            self._drift_images = generate(self.pipe, texts, self.gen, desc="drift: base model")
            self._drift_key = key
        return self._drift_images

    def _score_one(self, ref, real, prompts, texts, drift_texts, out: Path, key: str) -> dict:
        cache = out / "scores" / ref.run / f"{ref.name}.json"
        digest = ref.digest()
        hit = read_json(cache)
        if hit and hit.get("fingerprint") == key and hit.get("adapter_sha256") == digest:
            return hit["row"]
        drift_base = self._drift_base(drift_texts) if "drift" in self.suite.config.metrics else None
        checkpoints.apply(self.pipe, ref)
        groups = generate(self.pipe, prompts, self.gen, desc=f"generating {ref.name}")
        if self.gen.save_images:
            folder = out / "images" / ref.run / ref.name
            folder.mkdir(parents=True, exist_ok=True)
            for i, group in enumerate(groups):
                for j, image in enumerate(group):
                    image.save(folder / f"p{i:02d}_{j}.png")
        black = 0
        if self.protocol.skip_black:  # HRA: all-black (safety-checker) images are left out of every score
            groups, black = drop_black(groups)
        per_prompt, stats = self._scores(real, groups, texts)
        black_drift = 0
        if drift_base is not None:  # the same seeds on the drift prompts, base vs adapted
            base = sum(drift_base, [])
            adapted = sum(generate(self.pipe, drift_texts, self.gen, desc=f"drift {ref.name}"), [])
            if self.protocol.skip_black:
                base, adapted, black_drift = drop_black_pairs(base, adapted)
            drift = getattr(self.suite, "drift", drift_score)  # DINO cosine (PEFT); pixels (micro world)
            stats["drift"] = drift(base, adapted) if base else PairStat(0.0, 0)
            stats = {m: stats[m] for m in self.suite.config.metrics}
        row = {
            "run": ref.run,
            "name": ref.name,
            "step": ref.step,
            "kind": ref.kind,
            "path": str(ref.path),
            **({"delta_prime": ref.delta_prime} if ref.delta_prime is not None else {}),
            "metrics": {m: s.to_dict() for m, s in stats.items()},
        }
        if self.protocol.skip_black:
            row["black_images"] = black  # of the evaluation images; drift: pairs with a black image
            row["black_drift_pairs"] = black_drift
        if per_prompt is not None:
            row["per_prompt"] = {m: [x.to_dict() for x in v] for m, v in per_prompt.items()}
        write_json(cache, {"fingerprint": key, "adapter_sha256": digest, "row": row})
        return row

    def _scores(self, real, groups, texts) -> tuple[dict | None, dict[str, PairStat]]:
        """(per-prompt scores or None, pooled scores); empty scores when no image is left to score."""
        if not any(groups):  # every image was black
            metrics = [m for m in self.suite.config.metrics if m != "drift"]
            per_prompt = {m: [PairStat(0.0, 0)] * len(groups) for m in metrics}
            return (per_prompt if self._per_prompt else None), {m: PairStat(0.0, 0) for m in metrics}
        if self._per_prompt:
            per_prompt = self.suite.score_groups(real, groups, texts)
            return per_prompt, {m: sum(v, PairStat(0.0, 0)) for m, v in per_prompt.items()}
        return None, self.suite.score(real, groups, texts)


def clip_texts(prompts: list[str], token: str, keep_token: bool) -> list[str]:
    return list(prompts) if keep_token else [strip_token(p, token) for p in prompts]


def table_rows(report: dict) -> list[dict]:
    rows = []
    for r in report["checkpoints"]:
        rows.append(
            {
                "run": r["run"],
                "name": r["name"],
                "step": r["step"],
                "delta_prime": r.get("delta_prime"),
                **{m: PairStat.from_dict(s).mean for m, s in r["metrics"].items()},
                **({"black_images": r["black_images"]} if "black_images" in r else {}),
            }
        )
    rows.append(
        {
            "run": "real images",
            "name": "",
            "step": None,
            **{m: PairStat.from_dict(s).mean for m, s in report["real"].items()},
        }
    )
    return rows


def selected_rows(report: dict) -> list[dict]:
    """One row per run by the protocol's selection rule (best DINO step, HRA's best step per prompt,
    or the last step), over the checkpoints as trained (slider-sweep rows aside)."""
    protocol = get_protocol(report.get("protocol", {}).get("name", "default"))
    out = []
    for run in dict.fromkeys(r["run"] for r in report["checkpoints"]):
        rows = [r for r in report["checkpoints"] if r["run"] == run and r.get("delta_prime") is None]
        rows = [r for r in rows if r["step"] is not None] or rows
        if not rows:
            continue
        means = [{m: PairStat.from_dict(s).mean for m, s in r["metrics"].items()} for r in rows]
        rule = protocol.selection
        if rule == "best_per_prompt" and all("per_prompt" in r for r in rows):
            n = len(next(iter(rows[0]["per_prompt"].values())))
            units = [
                {
                    r["step"]: {
                        **{m: PairStat.from_dict(v[k]).mean for m, v in r["per_prompt"].items()},
                        **({"drift": mm["drift"]} if "drift" in mm else {}),
                    }
                    for r, mm in zip(rows, means, strict=True)
                }
                for k in range(n)
            ]
            steps, values = select_best_per_prompt(units, [m for m in rows[0]["per_prompt"]])
            out.append({"run": run, "rule": rule, "step": ",".join(map(str, steps)), **values})
            continue
        if rule == "best_dino" and "dino" in means[0]:
            i = max(range(len(rows)), key=lambda i: (means[i]["dino"], -(rows[i]["step"] or 0)))
        else:
            rule, i = "final", max(range(len(rows)), key=lambda i: rows[i]["step"] or 0)
        out.append({"run": run, "rule": rule, "step": rows[i]["step"], **means[i]})
    return out


def write_score_report(report: dict, out: Path, plots: bool = True) -> dict[str, Path]:
    metrics = [m for m in ALL_METRICS if m in report["metrics"]]
    protocol = get_protocol(report.get("protocol", {}).get("name", "default"))
    rows = table_rows(report)
    sweep = any(r.get("delta_prime") is not None for r in rows)
    black = any("black_images" in r for r in rows)  # a protocol that leaves all-black images out
    head = ["run", "name", "step", *(["delta_prime"] if sweep else []), *metrics]
    head += ["black_images"] if black else []
    paths = {"csv": write_csv(out / "report.csv", rows, head)}
    title = f"# Scores: {report.get('subject', 'subject')}\n\n" if report.get("subject") else ""
    named = [(m, protocol.column(m, NAMES[m])) for m in metrics]
    columns = [("run", "run"), ("name", "checkpoint"), ("step", "step")]
    columns += [("delta_prime", "δ'")] if sweep else []
    text = title + markdown_table(rows, columns + named + ([("black_images", "black")] if black else []))
    if black:
        text += "\nblack: all-black (safety-checker) images left out of the scores, per checkpoint.\n"
    report["selected"] = selected_rows(report)
    if report["selected"]:
        text += f"\nSelected by protocol {protocol.name} ({protocol.selection}):\n\n"
        text += markdown_table(
            report["selected"], [("run", "run"), ("rule", "rule"), ("step", "step(s)"), *named]
        )
    paths["md"] = write_text(out / "report.md", text)
    real = {m: PairStat.from_dict(s).mean for m, s in report["real"].items()}
    for m in metrics if plots else ():
        series: dict[str, list] = {}
        swept: dict[str, list] = {}
        for r in rows[:-1]:
            if r.get("delta_prime") is None:
                series.setdefault(r["run"], []).append((r["step"], r[m]))
            else:
                swept.setdefault(r["run"], []).append((r["delta_prime"], r[m]))
        paths[m] = curves_plot(out / "plots" / f"{m}.png", m, series, real.get(m))
        if swept:
            paths[f"sweep_{m}"] = curves_plot(
                out / "plots" / f"sweep_{m}.png", m, swept, real.get(m), xlabel="inference bound δ'"
            )
    paths["json"] = write_json(out / "report.json", report)  # last: a unit with report.json is complete
    return paths
