"""Evaluation protocols of the literature as data: models, pairing, token handling, selection, columns.

Published DreamBooth numbers are comparable only under the protocol that produced them. A
:class:`Protocol` fixes every choice that changes the numbers; ``python -m eval --protocol NAME`` uses
it and any explicit flag (a local model folder, say) overrides one field. The sources of each choice
are in the README table ("Evaluation protocols").

Selection rules (how one row per method is chosen from its checkpoints):
- ``best_dino``: the step with the best DINO (mean over subjects), every metric at that step;
- ``best_per_prompt``: HRA's ``get_result.py``: for each (subject, prompt) the step that maximises
  Σ_m v_m / (max v_m − min v_m) over the metrics' values at each step, then the mean over the
  (subject, prompt) units of every metric at its unit's step;
- ``final``: the last step (the DreamBooth paper reports the trained model, PEFT the test set at the end).

HRA's ``generation/subject/evaluate.py`` (read at DaShenZi721/HRA) also fixes how images enter the metrics:
LPIPS-vgg on both images resized to 512 x 512 (``Resize((512, 512))``: the aspect is squashed, nothing is
cropped), the DINO and CLIP processors on the uncropped images, and every pair (CLIP-T: every image) with an
all-black image left out (``getextrema()`` all zero: the safety checker's output). The ``nblora-paper``
preset carries these as ``lpips_resize="squash"``, ``center_crop=False`` and ``skip_black=True``; the
left-out images are counted in every report. Where all of a prompt's images are black its scores are
empty (NaN) here; HRA writes 0 for CLIP and NaN for DINO.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from PIL import Image

from .extractors import DEFAULT_METRICS, LPIPS_RESIZES, PAIRINGS, MetricConfig

SELECTIONS = ("best_dino", "best_per_prompt", "final")

# huggingface/peft method_comparison/image-gen default_training_params.json "drift_image_prompts", with
# its subject class ("cat") as the {class_noun} placeholder: 5 of the class without the token, 5 unrelated
PEFT_DRIFT_PROMPTS = (
    "a photo of {class_noun}",
    "a color drawing of {class_noun}",
    "{class_noun} sitting in a bathtub",
    "{class_noun} looks into a mirror",
    "a photo of {class_noun} next to a tree",
    "the Mona Lisa but she looks angry",
    "a dog holding a sign that says hello world",
    "a photo of the Eiffel tower at night",
    "an astronaut riding a horse",
    "3d design concept of a chair that looks like an avocado",
)
DRIFT_PROMPT_SETS = ("eval", "peft")  # the evaluation prompts without the token | PEFT's 10


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str  # where each choice comes from (one line; the README has the table)
    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    lpips_net: str = "alex"
    lpips_size: int = 256
    lpips_resize: str = "crop"  # extractors.LPIPS_RESIZES: "squash" is HRA's Resize((512, 512))
    center_crop: bool = True
    metrics: tuple[str, ...] = DEFAULT_METRICS
    pairing: str = "all"  # see extractors.PAIRINGS
    keep_token: bool = False  # CLIP-T text: the prompt with the rare token kept, or removed
    selection: str = "best_dino"  # SELECTIONS
    drift_prompts: str = "eval"  # DRIFT_PROMPT_SETS (a file on the command line)
    skip_black: bool = False  # leave all-black generated images (safety-checker output) out, and count them
    columns: Mapping[str, str] = field(default_factory=dict)  # metric -> the source's column name

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got {self.pairing!r}")
        if self.lpips_resize not in LPIPS_RESIZES:
            raise ValueError(f"lpips_resize must be one of {LPIPS_RESIZES}, got {self.lpips_resize!r}")
        if self.drift_prompts not in DRIFT_PROMPT_SETS:
            raise ValueError(f"drift_prompts must be one of {DRIFT_PROMPT_SETS}, got {self.drift_prompts!r}")
        MetricConfig(metrics=self.metrics)  # validates the metric names

    def metric_config(self, **overrides) -> MetricConfig:
        """The MetricConfig of this protocol; ``overrides`` (None values ignored) replace fields."""
        fields = {
            "dino_model": self.dino_model,
            "clip_model": self.clip_model,
            "clip_pretrained": self.clip_pretrained,
            "lpips_net": self.lpips_net,
            "lpips_size": self.lpips_size,
            "lpips_resize": self.lpips_resize,
            "center_crop": self.center_crop,
            "metrics": self.metrics,
            "pairing": self.pairing,
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return MetricConfig(**fields)

    def column(self, metric: str, default: str) -> str:
        return self.columns.get(metric, default)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "selection": self.selection,
            "keep_token": self.keep_token,
            **({"skip_black": True} if self.skip_black else {}),
        }


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            name="default",
            source="this project's choices (DreamBooth's models; LPIPS as diversity and as distance)",
        ),
        Protocol(
            # NB-LoRA Table 3's "Real Images" row equals HRA's Table 4 (arXiv 2405.17484); HRA's
            # generation/subject/evaluate.py + get_result.py
            name="nblora-paper",
            source="HRA (arXiv 2405.17484) evaluate.py/get_result.py, reused by NB-LoRA's Table 3",
            clip_model="ViT-L-14",
            lpips_net="vgg",
            lpips_size=512,  # HRA: Resize((512, 512)) of both images for LPIPS ...
            lpips_resize="squash",  # ... which squashes a non-square photo instead of cropping it
            center_crop=False,  # HRA hands the whole images to the DINO and CLIP processors
            skip_black=True,  # HRA skips a pair when either image's getextrema() is all zero
            metrics=("dino", "clip_i", "clip_t", "lpips_ref", "drift"),
            keep_token=True,  # HRA's CLIP-T prompt is "a qwe {class} ..." with the token
            selection="best_per_prompt",
            columns={"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "lpips_ref": "LPIPS"},
        ),
        Protocol(
            name="dreambooth",
            source="DreamBooth (arXiv 2208.12242) Sec. 4.1; OFT and DeLoRA use the same models",
            metrics=("dino", "clip_i", "clip_t", "lpips_div", "drift"),
            selection="final",
            columns={"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "lpips_div": "DIV"},
        ),
        Protocol(
            name="peft-image-gen",
            source="huggingface/peft method_comparison/image-gen (run.py evaluate/measure_drift, utils.py)",
            dino_model="facebook/dinov2-base",
            metrics=("dino", "drift"),
            pairing="matched",
            selection="final",
            drift_prompts="peft",
            columns={"dino": "test dino_similarity", "drift": "drift"},
        ),
    )
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def is_black(image: Image.Image) -> bool:
    """Every band of every pixel 0: the image a safety checker returns in place of a flagged one (HRA's
    ``all(min == max == 0 for min, max in image.getextrema())``)."""
    extrema = image.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)  # one (min, max) for a 1-band image
    return all(hi == 0 for _, hi in bands)


def drop_black(groups: Sequence[Sequence[Image.Image]]) -> tuple[list[list[Image.Image]], int]:
    """Each prompt's images without the all-black ones, and how many were left out (prompts stay, maybe
    empty, so the groups still line up with their texts)."""
    kept = [[im for im in g if not is_black(im)] for g in groups]
    return kept, sum(map(len, groups)) - sum(map(len, kept))


def drop_black_pairs(
    a: Sequence[Image.Image], b: Sequence[Image.Image]
) -> tuple[list[Image.Image], list[Image.Image], int]:
    """The pairs (a_i, b_i) with neither image all black (drift: base vs adapted images), and how many
    were left out."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not (is_black(x) or is_black(y))]
    return [x for x, _ in pairs], [y for _, y in pairs], len(a) - len(pairs)


def drift_prompts(spec: str, class_noun: str, eval_texts: Sequence[str]) -> list[str]:
    """The prompts drift is measured on: 'eval' (the evaluation prompts without the token), 'peft'
    (PEFT's 10 with this subject's class) or a file, one prompt per line ({class_noun} allowed)."""
    if spec == "eval":
        return list(eval_texts)
    if spec == "peft":
        return [t.format(class_noun=class_noun) for t in PEFT_DRIFT_PROMPTS]
    from pathlib import Path

    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"--drift_prompts {spec!r} is neither a file nor one of {', '.join(DRIFT_PROMPT_SETS)}"
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln.format(class_noun=class_noun) for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"drift prompt file {path} has no prompts")
    return prompts


def select_best_per_prompt(
    units: Sequence[Mapping[int, Mapping[str, float]]], metrics: Sequence[str]
) -> tuple[list[int], dict[str, float]]:
    """HRA's rule: for each unit (one subject's prompt) the step maximising Σ_m v_m / (max − min) over
    ``metrics`` (NaN counts as 0, as in HRA; a metric constant over the steps adds nothing), then the mean
    of each metric over the units at their chosen steps. ``units[u][step][metric]`` -> (steps, means).

    LPIPS enters the sum with a plus sign, as in HRA's ``get_result.py`` (there LPIPS is the distance to
    the photos, so this favours steps far from them; kept for the numbers to match).
    """
    chosen: list[int] = []
    for unit in units:
        steps = sorted(unit)
        if not steps:
            raise ValueError("a unit has no scored steps")
        score = [0.0] * len(steps)
        for m in metrics:
            values = [_nan0(unit[s].get(m, math.nan)) for s in steps]
            span = max(values) - min(values)
            if span > 0:
                score = [a + v / span for a, v in zip(score, values, strict=True)]
        chosen.append(steps[max(range(len(steps)), key=lambda i: (score[i], -i))])
    all_metrics = sorted({m for unit in units for s in unit for m in unit[s]})
    means = {}
    for m in all_metrics:
        vals = [unit[s][m] for unit, s in zip(units, chosen, strict=True) if m in unit[s]]
        means[m] = sum(vals) / len(vals) if vals else math.nan
    return chosen, means


def _nan0(x: float) -> float:
    return 0.0 if x is None or math.isnan(x) else float(x)
