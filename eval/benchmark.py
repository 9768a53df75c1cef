"""The DreamBooth benchmark: train every subject × method, score every checkpoint, tabulate.

Layout of OUT/:
    benchmark.json               settings shared by all units (a resumed run must use the same ones)
    runs/<method>/<subject>/     train_dreambooth.py output: checkpoint-N/ and the final adapter
    scores/<method>/<subject>/   score report of the unit (report.json, written last, marks it done)
    report/                      table.md/.csv, results.json, tradeoff_dino_clip_t.png, curves/<metric>.png

Resumable: finished units are skipped, a unit killed in training resumes from its latest checkpoint,
a unit killed in scoring reuses the checkpoints already scored. Shardable: ``--shard i/n`` runs the
units with index ≡ i (mod n); whichever shard finishes last writes the report.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nblora_diffusion.metrics import MetricConfig, Protocol, get_protocol, list_images, strip_token
from nblora_diffusion.metrics.protocols import drift_prompts

from . import checkpoints
from .dataset import DreamBoothBenchmark, Subject, format_prompt, prompt_templates, read_dataset
from .grids import merge_seeds
from .methods import Method, read_methods
from .peft_results import write_peft_results
from .report import read_json, write_json
from .score import GenerationConfig, Scorer, clip_texts
from .tables import write_benchmark_report

TRAINED = "benchmark_trained.json"  # in a run folder: training of this unit finished, with these options
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchmarkSpec:
    dataset: DreamBoothBenchmark
    base_model: str
    methods: list[Method]
    subjects: list[Subject]
    out: Path
    metrics: MetricConfig
    gen: GenerationConfig
    token: str = "sks"
    prompts: str = "dreambooth-auto"
    max_prompts: int | None = None
    keep_token: bool = False
    shard: tuple[int, int] = (0, 1)
    report_steps: tuple[int, ...] | None = None
    train_subprocess: bool = False
    allow_other_base: bool = False
    protocol: Protocol = field(default_factory=lambda: get_protocol("default"))
    drift_prompts: str = "eval"  # protocols.DRIFT_PROMPT_SETS or a file
    sweep_delta: tuple[float, ...] = ()  # δ' at which every NB-LoRA method's final adapter is scored

    @classmethod
    def from_args(
        cls, a, metrics: MetricConfig, gen: GenerationConfig, protocol: Protocol, drift: str = "eval"
    ) -> BenchmarkSpec:
        from .cli import sweep_deltas

        dataset = read_dataset(a.dataset)
        _, methods = read_methods(a.methods)
        try:
            i, n = (int(x) for x in a.shard.split("/"))
            if not 0 <= i < n:
                raise ValueError
        except ValueError:
            raise ValueError(f"--shard must be i/n with 0 <= i < n, got {a.shard!r}") from None
        try:
            steps = tuple(int(s) for s in a.report_steps.split(",")) if a.report_steps else None
        except ValueError:
            raise ValueError(
                f"--report_steps must be comma-separated integers, got {a.report_steps!r}"
            ) from None
        return cls(
            dataset=dataset,
            base_model=a.base_model,
            methods=methods,
            subjects=dataset.select(a.subjects),
            out=Path(a.out),
            metrics=metrics,
            gen=gen,
            token=a.token,
            prompts=a.prompts,
            max_prompts=a.max_prompts,
            keep_token=protocol.keep_token,
            shard=(i, n),
            report_steps=steps,
            train_subprocess=a.train_subprocess,
            allow_other_base=a.allow_other_base,
            protocol=protocol,
            drift_prompts=drift,
            sweep_delta=tuple(sweep_deltas(a.sweep_delta)),
        )

    def settings(self) -> dict:
        """What every unit of one benchmark folder must share."""
        return {
            "base_model": self.base_model,
            "token": self.token,
            "prompts": self.prompts,
            "max_prompts": self.max_prompts,
            "keep_token": self.keep_token,
            "metrics": self.metrics.describe(),
            "generation": self.gen.describe(),
            "dataset": str(self.dataset.root.resolve()),
            **({"protocol": self.protocol.name} if self.protocol.name != "default" else {}),
            **({"skip_black": True} if self.protocol.skip_black else {}),
            **({"drift_prompts": self.drift_prompts} if "drift" in self.metrics.metrics else {}),
        }

    def units(self) -> list[tuple[Subject, Method]]:
        """Every subject × method, subject-major (a subject's photos are embedded once per process)."""
        return [(s, m) for s in self.subjects for m in self.methods]

    def run_dir(self, s: Subject, m: Method) -> Path:
        return self.out / "runs" / m.id / s.name

    def score_dir(self, s: Subject, m: Method) -> Path:
        return self.out / "scores" / m.id / s.name

    def prompts_for(self, s: Subject) -> list[str]:
        spec = self.prompts
        if spec == "dreambooth-auto":
            templates = list(self.dataset.templates(s))
        else:
            templates = prompt_templates(spec, s.class_noun, self.dataset.root / "prompts_and_classes.txt")
        return [format_prompt(t, self.token, s.class_noun) for t in templates[: self.max_prompts]]


def train_options(spec: BenchmarkSpec, s: Subject, m: Method) -> dict:
    """The unit's training options: the method's, its subject's data and folder; seed 0 unless the
    method (or the file's "seeds") sets one, so that a re-run trains the same adapters."""
    run = spec.run_dir(s, m)
    opts = {
        "seed": 0,
        **m.options,
        "pretrained_model_name_or_path": spec.base_model,
        "instance_data_dir": str(s.folder),
        "instance_prompt": f"a photo of {spec.token} {s.class_noun}",
        "class_prompt": f"a photo of {s.class_noun}",
        "output_dir": str(run),
    }
    if spec.gen.base_model_config is not None:  # training loads the same single-file base model
        opts["base_model_config"] = spec.gen.base_model_config
    if spec.gen.allow_ckpt:
        opts["allow_ckpt"] = True
    if opts.get("with_prior_preservation"):  # class images are shared by every unit of the class
        opts["class_data_dir"] = str(spec.out / "class_images" / s.class_noun.replace(" ", "_"))
    return opts


def _cli_args(options: dict) -> list[str]:
    from nblora_diffusion.training import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    args = []
    for key, value in options.items():
        if value == defaults.get(key):
            continue
        if isinstance(value, bool):
            args += [f"--{key}"] if value else []
        else:
            args += [f"--{key}", str(value)]
    return args


def train_unit(spec: BenchmarkSpec, s: Subject, m: Method) -> None:
    """Train one unit to the end, resuming from its latest checkpoint if a previous run was killed."""
    from nblora_diffusion.training import TrainConfig, train
    from nblora_diffusion.training.checkpoint import checkpoints as saved

    run = spec.run_dir(s, m)
    opts = train_options(spec, s, m)
    marker = read_json(run / TRAINED)
    if marker is not None:
        if marker.get("options") != opts:
            raise ValueError(
                f"{run} was trained with other options than method {m.name!r} has now; "
                "use another --out or remove that run"
            )
        return
    resume = {"resume_from_checkpoint": "latest"} if saved(run) else {"overwrite_output_dir": True}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if spec.train_subprocess:
        cmd = [sys.executable, str(ROOT / "train_dreambooth.py"), *_cli_args({**opts, **resume})]
        done = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"training {m.name} on {s.name} failed: {tail}")
    else:
        result = train(TrainConfig(**opts, **resume))
        if result.stopped:
            raise ValueError(f"training {m.name} on {s.name} stopped at step {result.final_step}")
    info = {"train_time": time.perf_counter() - t0}  # this session's (a resumed unit: since the resume)
    if torch.cuda.is_available() and not spec.train_subprocess:
        info["accelerator_memory_max"] = torch.cuda.max_memory_reserved()
    write_json(run / TRAINED, {"options": opts, **info})


def unit_done(spec: BenchmarkSpec, s: Subject, m: Method) -> bool:
    return (spec.run_dir(s, m) / TRAINED).is_file() and (spec.score_dir(s, m) / "report.json").is_file()


def score_unit(spec: BenchmarkSpec, scorer: Scorer, s: Subject, m: Method) -> dict:
    refs = [dataclasses.replace(r, run=m.id) for r in checkpoints.discover(spec.run_dir(s, m))]
    if spec.sweep_delta and refs[-1].kind == "nblora":  # the final adapter along the slider
        refs += checkpoints.sweep(refs[-1], list(spec.sweep_delta))
    prompts = spec.prompts_for(s)
    texts = clip_texts(prompts, spec.token, spec.keep_token)
    drift = None
    if "drift" in spec.metrics.metrics and isinstance(spec.metrics, MetricConfig):
        free = [strip_token(p, spec.token) for p in prompts]
        drift = drift_prompts(spec.drift_prompts, s.class_noun, free)
    info = {
        "subject": s.name,
        "class_noun": s.class_noun,
        "token": spec.token,
        "method": m.id,
        "method_name": m.name,
        "keep_token": spec.keep_token,
    }
    return scorer.score_subject(
        refs,
        list_images(s.folder),
        prompts,
        texts,
        spec.score_dir(s, m),
        info=info,
        progress=False,
        plots=False,  # the benchmark report has the curves of every method
        drift_texts=drift,
    )


def check_settings(spec: BenchmarkSpec) -> None:
    path = spec.out / "benchmark.json"
    settings = spec.settings()
    found = read_json(path)
    if found is None:
        write_json(path, settings)
    elif found != settings:
        diff = sorted(k for k in settings if found.get(k) != settings[k])
        raise ValueError(
            f"{spec.out} holds a benchmark with other settings ({', '.join(diff)}); "
            "use another --out or the same settings"
        )


def shard_units(units: list, i: int, n: int) -> list:
    """Shard i of n: every n-th unit from the i-th (disjoint shards that together cover all units)."""
    return units[i::n]


def run(spec: BenchmarkSpec, report_only: bool = False) -> int:
    units = spec.units()
    if not report_only:
        check_settings(spec)
        i, n = spec.shard
        mine = shard_units(units, i, n)
        todo = [u for u in mine if not unit_done(spec, *u)]
        print(
            f"benchmark: {len(units)} units, {len(mine)} in shard {i}/{n}, {len(mine) - len(todo)} done",
            file=sys.stderr,
        )
        if todo:
            scorer = Scorer(
                spec.base_model,
                spec.metrics,
                spec.gen,
                allow_other_base=spec.allow_other_base,
                protocol=spec.protocol,
            ).load()
            for s, m in tqdm(todo, desc="benchmark", unit="unit"):
                train_unit(spec, s, m)
                score_unit(spec, scorer, s, m)
    pending = [f"{m.id}/{s.name}" for s, m in units if not unit_done(spec, s, m)]
    if pending:
        print(
            f"benchmark: {len(pending)} unit(s) not finished yet (other shards?): {', '.join(pending[:5])}"
            f"{' ...' if len(pending) > 5 else ''}",
            file=sys.stderr,
        )
        return 0 if not report_only else 1
    write_peft_results(spec, units)
    reports = {
        (s.name, m.id): json.loads((spec.score_dir(s, m) / "report.json").read_text(encoding="utf-8"))
        for s, m in units
    }
    methods, subjects, reports = merge_seeds(spec.methods, [s.name for s in spec.subjects], reports)
    paths = write_benchmark_report(
        spec.out / "report",
        methods,
        subjects,
        reports,
        spec.metrics.metrics,
        spec.report_steps,
        protocol=spec.protocol,
    )
    print(paths["md"].read_text(encoding="utf-8"))
    print(f"report: {paths['md'].parent}")
    return 0
