"""Quality gates of the micro SD, read by the judges on prompts never seen in pretraining.

    python -m nblora_diffusion.microworld gates [--model DIR] [--seeds 2]

Per attribute, the fraction of images whose judged value is the prompt's: on every held-out (kind,
colour, background) triple at every position. And the check that the base model does not already draw
the DreamBooth subjects (the judge's subject reading on "a photo of sks <class>" and the class prompt).
"""

from __future__ import annotations

import os

import torch

from .pretrain import held_out
from .world import COLOR_NAMES, KINDS, POSITIONS, Scene, caption

GATES = {"background": 0.90, "color": 0.80, "kind": 0.80}


def held_out_prompts() -> list[tuple[str, dict[str, str]]]:
    out = []
    for k in KINDS:
        for c in COLOR_NAMES:
            for b in COLOR_NAMES:
                if c != b and held_out(k, c, b):
                    for p in POSITIONS:
                        want = {"kind": k, "color": c, "background": b, "position": p}
                        out.append((caption(Scene(k, c, b, p)), want))
    return out


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: int, steps: int = 20, guidance: float = 5.0, batch: int = 64):
    images = []
    jobs = [(p, s) for s in range(seeds) for p in prompts]
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        gens = [torch.Generator("cpu").manual_seed(1000 * s + j) for j, (_, s) in enumerate(chunk, start=i)]
        images += pipe(
            prompt=[p for p, _ in chunk], generator=gens, num_inference_steps=steps, guidance_scale=guidance
        ).images
    return images


def measure(model: str | os.PathLike | None = None, seeds: int = 2, limit: int | None = None) -> dict:
    """The gates' numbers (``limit``: only the first prompts, for a quick look)."""
    from ..diffusion import load_pipeline
    from ..metrics import MicroWorldSuite
    from ..metrics.microworld import to_tensor
    from . import model_path
    from .subjects import SUBJECTS, TOKEN

    pipe = load_pipeline(model or model_path())
    pipe.set_progress_bar_config(disable=True)
    suite = MicroWorldSuite().load()
    prompts = held_out_prompts()[:limit]
    images = generate(pipe, [p for p, _ in prompts], seeds)
    read = suite.read(to_tensor(images))
    wants = [w for _ in range(seeds) for _, w in prompts]
    acc = {
        a: sum(read[a][i] == w[a] for i, w in enumerate(wants)) / len(wants)
        for a in ("background", "color", "kind", "position")
    }
    subject_rate = {}
    for s in SUBJECTS:
        imgs = generate(pipe, [f"a photo of {TOKEN} {s.kind}", f"a photo of a {s.kind}"], seeds=2 * seeds)
        r = suite.read(to_tensor(imgs))
        hits = [k == s.kind and q == s.pattern for k, q in zip(r["kind"], r["pattern"], strict=True)]
        subject_rate[s.name] = sum(hits) / len(hits)
    return {
        "held_out_prompts": len(prompts),
        "images": len(images),
        "accuracy": acc,
        "chance": {"background": 1 / 6, "color": 1 / 6, "kind": 1 / 6, "position": 1 / 3},
        "gates": GATES,
        "passed": all(acc[a] >= g for a, g in GATES.items()),
        "base_draws_subject": subject_rate,
    }
