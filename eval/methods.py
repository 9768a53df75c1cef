"""The methods file of the benchmark: shared train_dreambooth.py options plus one entry per method.

    {"train": {"max_train_steps": 1000, "checkpointing_steps": 200, ...},
     "methods": [{"id": "lora_r16", "name": "LoRA r=16", "adapter": "lora", "rank": 16},
                 {"id": "nblora_p2_d1.5", "name": "NB-LoRA p=2 δ=1.5", "adapter": "nblora", "norm_p": "2",
                  "norm_bound": 1.5}, ...]}

Keys are TrainConfig fields (train_dreambooth.py options without dashes); the runner sets the model,
data, prompts and output folder of each unit itself. A top-level ``"seeds": [0, 1]`` trains every
method once per seed (ids ``<id>.s<seed>``, one ``group``); the report then aggregates each group over
subjects × seeds (``grids.merge_seeds``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from nblora_diffusion.training import TrainConfig

HERE = Path(__file__).resolve().parent
PRESETS = {
    "table3": HERE / "table3.json",  # the paper's SD grid
    "table3-micro": HERE / "table3_micro.json",  # the same grid on the micro world
}
RUNNER_KEYS = (
    "pretrained_model_name_or_path",
    "instance_data_dir",
    "instance_prompt",
    "class_prompt",
    "class_data_dir",
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "demo",
    "local_rank",
)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Method:
    id: str  # folder name of its runs and scores
    name: str  # label in tables and plots
    options: dict  # TrainConfig fields: shared options updated with the method's own
    group: str | None = None  # with "seeds": the id shared by the method's seeds (the report's row)
    group_name: str | None = None


def _check_options(where: str, options: dict) -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown train_dreambooth.py options {unknown}")
    reserved = sorted(set(options) & set(RUNNER_KEYS))
    if reserved:
        raise ValueError(f"{where}: {reserved} are set by the benchmark runner, remove them")


def read_methods(spec: str) -> tuple[dict, list[Method]]:
    """(shared train options, methods) from a preset name or a JSON file; every method is validated."""
    path = PRESETS.get(spec, Path(spec))
    if not path.is_file():
        raise ValueError(
            f"--methods {spec!r} is neither a JSON file nor one of the presets {', '.join(PRESETS)}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"methods file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("methods"), list) or not data["methods"]:
        raise ValueError(f"methods file {path} needs a non-empty 'methods' list")
    shared = data.get("train", {})
    _check_options(f"{path} 'train'", shared)
    methods = []
    for i, entry in enumerate(data["methods"]):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ValueError(f"{path}: method #{i + 1} needs a 'name'")
        options = {k: v for k, v in entry.items() if k not in ("id", "name")}
        name = str(entry["name"])
        mid = str(entry.get("id") or re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_"))
        if not _ID.match(mid):
            raise ValueError(f"{path}: method id {mid!r} must be letters, digits, '.', '_' or '-'")
        _check_options(f"{path} method {name!r}", options)
        merged = {**shared, **options}
        try:  # validate now, with placeholders for what the runner fills in
            TrainConfig(
                **merged,
                instance_data_dir=".",
                instance_prompt="a photo of sks dog",
                class_prompt="a photo of dog",
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} method {name!r}: {e}") from None
        methods.append(Method(mid, name, merged))
    seeds = data.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(type(x) is int for x in seeds):
            raise ValueError(f"{path}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{path}: duplicate seeds {seeds}")
        methods = [
            Method(f"{m.id}.s{k}", f"{m.name} (seed {k})", {**m.options, "seed": k}, m.id, m.name)
            for m in methods
            for k in seeds
        ]
    ids = [m.id for m in methods]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate method ids {dupes}")
    return shared, methods
