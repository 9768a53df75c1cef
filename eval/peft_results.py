"""Benchmark results in the shape of PEFT's ``method_comparison`` result JSON, one file per unit.

PEFT's image-gen benchmark (huggingface/peft, method_comparison/image-gen/results/*.json) writes
``run_info`` (experiment, train config, adapter config), ``train_info`` (accelerator_memory_max,
train_time, file_size, num_trainable_params, status, metrics: a list of per-step dicts, the last one
holding "test dino_similarity" and "drift") and ``meta_info`` (package and system versions). Ours have
the same keys, so NB-LoRA rows can sit next to PEFT's; values PEFT has and we do not measure (reserved
memory averages) are null. The metric names are the protocol's columns (PEFT's under
``--protocol peft-image-gen``).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
from pathlib import Path

from nblora_diffusion.metrics import PairStat

from .report import read_json, write_json

PEFT_RESULTS = "peft_results"  # OUT/peft_results/<method>--<subject>.json


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


def peft_result(*, experiment: str, run: Path, marker: dict, report: dict, protocol) -> dict:
    """One unit's result dict in PEFT's layout (see the module docstring)."""
    files = adapter_files(run)
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
    import diffusers
    import torch
    import transformers

    return {
        "run_info": {
            "created_at": dt.datetime.now(tz=dt.timezone.utc).replace(microsecond=0).isoformat(),
            "total_time": None,
            "experiment_name": experiment,
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
            "num_trainable_params": count_parameters(files),
            "status": "success",
            "metrics": steps,
        },
        "meta_info": {
            "package_info": {
                "transformers-version": transformers.__version__,
                "diffusers-version": diffusers.__version__,
                "torch-version": torch.__version__,
            },
            "system_info": {
                "system": platform.system(),
                "release": platform.release(),
                "machine": platform.machine(),
                "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            },
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
        )
        paths.append(write_json(spec.out / PEFT_RESULTS / f"{m.id}--{s.name}.json", result))
    return paths
