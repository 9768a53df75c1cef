"""Command line: ``python -m eval score ...`` and ``python -m eval benchmark ...``.

Errors (missing subject, empty folder, a checkpoint of another base model, a missing metric model)
print one ``error: ...`` line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from nblora_diffusion.devices import resolve_device
from nblora_diffusion.metrics import (
    METRICS,
    MICRO_METRICS,
    PROTOCOLS,
    MetricConfig,
    MicroWorldConfig,
    Protocol,
    get_protocol,
)
from nblora_diffusion.metrics.extractors import LPIPS_RESIZES
from nblora_diffusion.metrics.protocols import DRIFT_PROMPT_SETS

from .dataset import PROMPT_SETS

_DEFAULT = MetricConfig()


def _metric_list(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def add_metric_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "protocol and metric models (hub id / open_clip name or a local folder or file; "
        "unset options take the protocol's value)"
    )
    g.add_argument(
        "--protocol",
        default="default",
        choices=tuple(PROTOCOLS),
        help="the published protocol to reproduce: models, pairing, token handling, selection, columns "
        "(README: Evaluation protocols)",
    )
    g.add_argument("--dino_model", default=None, help="transformers DINO ViT or DINOv2 id or folder")
    g.add_argument(
        "--clip_model",
        default=None,
        help="open_clip architecture (ViT-B-32, ViT-L-14, ...) or an open_clip local-dir folder",
    )
    g.add_argument(
        "--clip_pretrained",
        default=None,
        help="open_clip pretrained tag or checkpoint file (ignored for a folder)",
    )
    g.add_argument("--lpips_net", default=None, choices=("alex", "vgg", "squeeze"))
    g.add_argument(
        "--lpips_model",
        default=None,
        help="full LPIPS state dict file (default: ImageNet trunk "
        "from the torch hub cache + the lpips package's linear layers)",
    )
    g.add_argument("--lpips_size", type=int, default=None, help="LPIPS image size in px")
    g.add_argument(
        "--lpips_resize",
        default=None,
        choices=LPIPS_RESIZES,
        help="LPIPS inputs: crop (shorter side to the size, center crop) or squash (both sides, HRA's)",
    )
    g.add_argument(
        "--no_center_crop", action="store_true", help="do not center-crop images to a square first"
    )
    g.add_argument(
        "--metrics",
        type=_metric_list,
        default=None,
        help=f"comma-separated subset of {','.join(METRICS)} (drift: PEFT's forgetting, 1 - mean DINO "
        f"cosine of base and adapted images); or microworld (the micro world's judges: "
        f"{','.join(MICRO_METRICS)}), or a subset of those",
    )
    g.add_argument(
        "--drift_prompts",
        default=None,
        help="prompts of the drift metric: eval (the prompts without the token), peft (PEFT's 10, "
        "with the class noun) or a file, one per line ({class_noun} allowed)",
    )
    g.add_argument("--metric_batch_size", type=int, default=_DEFAULT.batch_size)
    g.add_argument(
        "--metric_device", default=None, help="device of the metric models (default: cuda if present)"
    )
    g.add_argument("--keep_token", action="store_true", help="CLIP-T with the rare token kept in the prompt")
    g.add_argument(
        "--skip_black",
        action="store_true",
        help="leave all-black generated images (a safety checker's output) out of the scores and count "
        "them (on under --protocol nblora-paper, as in HRA)",
    )


def protocol_of(a: argparse.Namespace) -> Protocol:
    """The protocol with the command line's token handling and drift prompts folded in."""
    p = get_protocol(a.protocol)
    changes = {"keep_token": p.keep_token or a.keep_token, "skip_black": p.skip_black or a.skip_black}
    if a.drift_prompts in DRIFT_PROMPT_SETS:
        changes["drift_prompts"] = a.drift_prompts
    return dataclasses.replace(p, **changes)


def drift_spec(a: argparse.Namespace) -> str:
    return a.drift_prompts or get_protocol(a.protocol).drift_prompts


def metric_config(a: argparse.Namespace) -> MetricConfig | MicroWorldConfig:
    metrics = a.metrics
    micro_only = set(MICRO_METRICS) - set(METRICS)
    if metrics == ("microworld",):
        return MicroWorldConfig()
    if metrics and set(metrics) <= set(MICRO_METRICS) and set(metrics) & micro_only:
        return MicroWorldConfig(metrics=metrics)
    p = get_protocol(a.protocol)
    config = p.metric_config(
        dino_model=a.dino_model,
        clip_model=a.clip_model,
        clip_pretrained=a.clip_pretrained,
        lpips_net=a.lpips_net,
        lpips_model=a.lpips_model,
        lpips_size=a.lpips_size,
        lpips_resize=a.lpips_resize,
        center_crop=p.center_crop and not a.no_center_crop,
        device=a.metric_device,
        batch_size=a.metric_batch_size,
        metrics=metrics,
    )
    if a.clip_pretrained == "":  # --clip_pretrained "": no pretrained tag
        config = dataclasses.replace(config, clip_pretrained=None)
    return config


def sweep_deltas(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        deltas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep_delta must be comma-separated numbers, got {text!r}") from None
    if not deltas or any(not d >= 0 or d == float("inf") for d in deltas):
        raise ValueError(f"--sweep_delta needs finite numbers >= 0, got {text!r}")
    return deltas


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (fixed seeds: the same noise for every checkpoint and method)")
    g.add_argument(
        "--prompts",
        default="dreambooth-auto",
        help=f"prompt file (one per line, {{0}}/{{token}} and {{1}}/{{class_noun}} placeholders) or one of "
        f"{', '.join(PROMPT_SETS)} (auto: live list for cats and dogs)",
    )
    g.add_argument("--max_prompts", type=int, default=None, help="use only the first N prompts")
    g.add_argument("--images_per_prompt", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num_inference_steps", type=int, default=50)
    g.add_argument("--guidance_scale", type=float, default=7.5)
    g.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    g.add_argument("--gen_batch_size", type=int, default=8, help="images per pipeline call")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    g.add_argument(
        "--base_model_config",
        default=None,
        help="configs of a single-file --base_model: sd15, sd21-base, sd21-v, sdxl-base or a diffusers "
        "folder (default: inferred from the file's keys)",
    )
    g.add_argument(
        "--allow_ckpt", action="store_true", help="accept a pickled .ckpt --base_model (weights-only loader)"
    )
    g.add_argument("--device", default=None, help="pipeline device (default: cuda if present)")
    g.add_argument("--no_save_images", action="store_true", help="do not keep the generated PNGs")
    g.add_argument(
        "--allow_other_base",
        action="store_true",
        help="score adapters whose recorded base model differs from --base_model",
    )


def generation_config(a: argparse.Namespace):
    from .score import GenerationConfig

    return GenerationConfig(
        images_per_prompt=a.images_per_prompt,
        seed=a.seed,
        num_inference_steps=a.num_inference_steps,
        guidance_scale=a.guidance_scale,
        resolution=a.resolution,
        batch_size=a.gen_batch_size,
        dtype=a.dtype,
        base_model_config=a.base_model_config,
        allow_ckpt=a.allow_ckpt,
        device=a.device,
        save_images=not a.no_save_images,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="DreamBooth evaluation: DINO, CLIP-I, "
        "CLIP-T and LPIPS per checkpoint, and the benchmark runner.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score every checkpoint of one or more runs on one subject")
    s.add_argument(
        "--base_model", required=True, help="hub id, local diffusers folder or single .safetensors file"
    )
    s.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        help="run folder(s): every checkpoint-*/ inside and the final adapter; or adapter folders",
    )
    s.add_argument("--instance_dir", required=True, help="the subject's real photos")
    s.add_argument(
        "--class_noun",
        default=None,
        help="e.g. dog (default: from prompts_and_classes.txt next to --instance_dir)",
    )
    s.add_argument("--token", default=None, help="rare token (default: the adapter's, else sks)")
    s.add_argument("--out", required=True, help="report folder")
    s.add_argument(
        "--sweep_delta",
        default=None,
        help="comma-separated inference bounds δ' (e.g. 0,0.25,0.5,1): also score each NB-LoRA run's "
        "last adapter at every δ' with the norm-bound slider, without retraining",
    )
    add_generation_args(s)
    add_metric_args(s)

    b = sub.add_parser("benchmark", help="train every subject x method, score every checkpoint, tabulate")
    b.add_argument(
        "--dataset", required=True, help="DreamBooth dataset folder (subjects + prompts_and_classes.txt)"
    )
    b.add_argument(
        "--base_model", required=True, help="hub id, local diffusers folder or single .safetensors file"
    )
    b.add_argument("--methods", required=True, help="methods JSON file or a built-in grid: table3")
    b.add_argument("--subjects", default="all", help="all, or comma-separated subject names")
    b.add_argument("--out", required=True)
    b.add_argument("--token", default="sks")
    b.add_argument(
        "--shard", default="0/1", help="i/n: run the units with index %% n == i (one process per GPU)"
    )
    b.add_argument(
        "--report_steps",
        default=None,
        help="comma-separated steps for fixed-step rows (default: the last step)",
    )
    b.add_argument(
        "--train_subprocess",
        action="store_true",
        help="train each unit with `python train_dreambooth.py ...` instead of in this process",
    )
    b.add_argument("--report_only", action="store_true", help="only (re)write the report from finished units")
    b.add_argument(
        "--sweep_delta",
        default=None,
        help="comma-separated δ': also score every NB-LoRA method's final adapter at each δ' (the slider); "
        "the report plots the sweep beside the methods trained at those δ",
    )
    add_generation_args(b)
    add_metric_args(b)
    return parser


def run_score(a: argparse.Namespace) -> int:
    from nblora_diffusion.metrics import list_images, strip_token
    from nblora_diffusion.metrics.protocols import drift_prompts

    from . import checkpoints
    from .dataset import find_prompts_file, format_prompt, prompt_templates, read_prompt_lists
    from .score import Scorer, clip_texts

    real = list_images(a.instance_dir)
    prompts_file = find_prompts_file(a.instance_dir)
    class_noun = a.class_noun
    if class_noun is None:
        subject = Path(a.instance_dir).resolve().name
        classes = read_prompt_lists(prompts_file).classes if prompts_file else {}
        if subject not in classes:
            raise ValueError(
                f"--class_noun is required: no prompts_and_classes.txt next to {a.instance_dir} "
                f"lists subject {subject!r}"
            )
        class_noun = classes[subject]
    refs, labels = [], {}
    for folder in a.adapters:
        found = checkpoints.discover(folder)
        label = found[0].run
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:
            label = f"{label}-{labels[label]}"
        refs += [dataclasses.replace(r, run=label) for r in found]
    deltas = sweep_deltas(a.sweep_delta)
    if deltas:
        last = {r.run: r for r in refs}  # each run's last adapter (discover sorts by step)
        nblora = [r for r in last.values() if r.kind == "nblora"]
        if not nblora:
            raise ValueError("--sweep_delta needs at least one NB-LoRA run among --adapters")
        refs += [x for r in nblora for x in checkpoints.sweep(r, deltas)]
    token = a.token or next((r.token for r in refs if r.token), None) or "sks"
    templates = prompt_templates(a.prompts, class_noun, prompts_file)[: a.max_prompts]
    prompts = [format_prompt(t, token, class_noun) for t in templates]
    protocol = protocol_of(a)
    texts = clip_texts(prompts, token, protocol.keep_token)
    metrics = metric_config(a)
    scorer = Scorer(
        a.base_model, metrics, generation_config(a), allow_other_base=a.allow_other_base, protocol=protocol
    )
    scorer.check(refs)  # before loading anything
    drift = (
        drift_prompts(drift_spec(a), class_noun, [strip_token(p, token) for p in prompts])
        if "drift" in metrics.metrics and isinstance(metrics, MetricConfig)
        else None
    )
    scorer.load()
    report = scorer.score_subject(
        refs,
        real,
        prompts,
        texts,
        a.out,
        info={
            "subject": Path(a.instance_dir).resolve().name,
            "class_noun": class_noun,
            "token": token,
            "keep_token": protocol.keep_token,
        },
        drift_texts=drift,
    )
    out = Path(a.out)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(
        f"report: {out / 'report.json'}, {out / 'report.csv'}, {out / 'report.md'}, plots in {out / 'plots'}"
    )
    return 0 if report["checkpoints"] else 1


def run_benchmark(a: argparse.Namespace) -> int:
    from .benchmark import BenchmarkSpec, run

    spec = BenchmarkSpec.from_args(a, metric_config(a), generation_config(a), protocol_of(a), drift_spec(a))
    return run(spec, report_only=a.report_only)


def check_devices(a: argparse.Namespace) -> None:
    """--device and --metric_device name devices this machine has (before anything is loaded)."""
    for flag in ("device", "metric_device"):
        try:
            resolve_device(getattr(a, flag, None))
        except ValueError as e:
            raise ValueError(f"--{flag}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_devices(args)
        return run_score(args) if args.command == "score" else run_benchmark(args)
    except ValueError as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
