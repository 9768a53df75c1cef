"""Benchmark results in the shape of PEFT's ``method_comparison`` result JSON, one file per unit.

PEFT's image-gen benchmark (huggingface/peft, method_comparison/image-gen/results/*.json, written by
``utils.log_results``) has three parts, and ours have the same keys so NB-LoRA rows can sit next to PEFT's:
- ``run_info``: created_at, total_time, experiment_name, peft_branch, train_config, peft_config, error_msg;
- ``train_info``: accelerator_memory_reserved_avg, accelerator_memory_max, accelerator_memory_reserved_99th,
  train_time, file_size, num_trainable_params, num_total_params, status, metrics (a list of per-step dicts;
  PEFT's last one holds "test dino_similarity" and "drift");
- ``meta_info``: model_info and dataset_info (hub sha and creation date), package_info, system_info,
  pytorch_info.
Values PEFT has and we do not measure (reserved-memory average and percentile, hub shas, the PEFT branch)
are null. The metric names are the protocol's columns (PEFT's under ``--protocol peft-image-gen``).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
from pathlib import Path

from nblora_diffusion.metrics import PairStat

from .report import read_json, write_json

PEFT_RESULTS = "peft_results"  # OUT/peft_results/<method>--<subject>.json
PACKAGES = ("transformers", "peft", "datasets", "diffusers", "torch")  # PEFT's package_info, in its order


def adapter_files(run: Path) -> list[Path]:
    """The final adapter's weight files of a run folder (NB-LoRA or diffusers LoRA)."""
    nb = sorted(run.glob("nblora_*.safetensors"))
    return nb or sorted(run.glob("pytorch_lora_weights.safetensors"))


def count_parameters(files: list[Path]) -> int:
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def base_parameters(base_model: str, options: dict) -> int | None:
    """Parameters of the base model's adapted components (the UNet, and the text encoders when they are
    trained) of a local diffusers folder; None for a hub id or a single file (not counted)."""
    root = Path(base_model)
    if not (root / "model_index.json").is_file():
        return None
    names = ["unet"] + (["text_encoder", "text_encoder_2"] if options.get("train_text_encoder") else [])
    # one dot: the weights, or their shards; fp16/bf16 variants (name.fp16.safetensors) are copies
    files = [f for n in names for f in sorted((root / n).glob("*.safetensors")) if f.name.count(".") == 1]
    return count_parameters(files) if files else None


def package_info() -> dict[str, str | None]:
    """PEFT's package_info keys: each package's version (None when not installed) and commit hash
    (None: installed from a wheel)."""
    info: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        info[f"{name}-version"] = version
        info[f"{name}-commit-hash"] = None
    return info


def peft_result(
    *, experiment: str, run: Path, marker: dict, report: dict, protocol, base_model: str | None = None
) -> dict:
    """One unit's result dict in PEFT's layout (see the module docstring)."""
    files = adapter_files(run)
    trainable = count_parameters(files)
    base = base_parameters(base_model, marker.get("options", {})) if base_model else None
    config = read_json(run / "nblora_config.json") or read_json(run / "train_config.json") or {}
    steps = []
    for row in sorted(
        (r for r in report["checkpoints"] if r.get("delta_prime") is None and r["step"] is not None),
        key=lambda r: r["step"],
    ):
        entry = {"step": row["step"]}
        for m, stat in row["metrics"].items():
            entry[protocol.column(m, m)] = PairStat.from_dict(stat).mean
        steps.append(entry)
    import torch

    return {
        "run_info": {
            "created_at": dt.datetime.now(tz=dt.timezone.utc).replace(microsecond=0).isoformat(),
            "total_time": None,
            "experiment_name": experiment,
            "peft_branch": None,
            "train_config": marker.get("options", {}),
            "peft_config": config,
            "evaluation_protocol": protocol.name,
            "error_msg": "",
        },
        "train_info": {
            "accelerator_memory_reserved_avg": None,
            "accelerator_memory_max": marker.get("accelerator_memory_max"),
            "accelerator_memory_reserved_99th": None,
            "train_time": marker.get("train_time"),
            "file_size": sum(p.stat().st_size for p in files),
            "num_trainable_params": trainable,
            "num_total_params": base + trainable if base is not None else None,
            "status": "success",
            "metrics": steps,
        },
        "meta_info": {
            "model_info": {"sha": None, "created_at": None},
            "dataset_info": {"sha": None, "created_at": None},
            "package_info": package_info(),
            "system_info": {
                "system": platform.system(),
                "release": platform.release(),
                "version": platform.version(),
                "machine": platform.machine(),
                "processor": platform.processor(),
                "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            },
            "pytorch_info": torch.__config__.show(),
        },
    }


def write_peft_results(spec, units) -> list[Path]:
    """OUT/peft_results/<method>--<subject>.json for every finished unit of the benchmark."""
    from .benchmark import TRAINED

    paths = []
    for s, m in units:
        run = spec.run_dir(s, m)
        report = json.loads((spec.score_dir(s, m) / "report.json").read_text(encoding="utf-8"))
        result = peft_result(
            experiment=f"{m.id}/{s.name}",
            run=run,
            marker=read_json(run / TRAINED) or {},
            report=report,
            protocol=spec.protocol,
            base_model=spec.base_model,
        )
        paths.append(write_json(spec.out / PEFT_RESULTS / f"{m.id}--{s.name}.json", result))
    return paths
