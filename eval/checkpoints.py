"""Which adapters a run folder holds (every checkpoint-N and the final adapter) and loading them.

NB-LoRA folders (nblora_config.json) load with ``diffusion.load_adapter``; PEFT baselines
(pytorch_lora_weights.safetensors) with diffusers' stock ``pipe.load_lora_weights``. Base weights are
never modified (no merging), so scoring a checkpoint does not depend on what was scored before it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from nblora_diffusion import diffusion

LORA_FILE = "pytorch_lora_weights.safetensors"
TRAIN_CONFIG = "train_config.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class AdapterRef:
    name: str  # "checkpoint-200", or "final" for the adapter at the top of a run folder
    path: Path
    kind: str  # "nblora" | "lora" (any diffusers-format LoRA: LoRA, DoRA, PiSSA exports)
    step: int | None
    base_model: str | None
    token: str | None
    run: str = "run"  # label of the run folder (the series in plots, the sub-folder of cached scores)
    delta_prime: float | None = None  # NB-LoRA slider: scored at inference bound δ' (None: as trained)

    def digest(self) -> str:
        """sha256 over the adapter's weight and config files: a changed checkpoint is scored again."""
        h = hashlib.sha256()
        names = (
            [diffusion.CONFIG_NAME, *sorted(p.name for p in self.path.glob("nblora_*.safetensors"))]
            if self.kind == "nblora"
            else [LORA_FILE]
        )
        for name in names:
            with open(self.path / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        if self.delta_prime is not None:
            h.update(f"delta_prime={self.delta_prime!r}".encode())
        return h.hexdigest()


def _kind(folder: Path) -> str | None:
    if (folder / diffusion.CONFIG_NAME).is_file():
        return "nblora"
    if (folder / LORA_FILE).is_file():
        return "lora"
    return None


def _train_config(run: Path) -> dict:
    try:
        return json.loads((run / TRAIN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _last_logged_step(run: Path) -> int | None:
    try:
        with open(run / "train_log.csv", newline="") as f:
            steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("step", "").isdigit()]
        return max(steps) if steps else None
    except (OSError, ValueError, KeyError):
        return None


def _ref(name: str, folder: Path, run: Path, step: int | None) -> AdapterRef:
    kind = _kind(folder)
    info = diffusion.read_adapter_config(folder) if kind == "nblora" else {}
    train = _train_config(run)
    if step is None:
        step = info.get("global_step")
    return AdapterRef(
        name=name,
        path=folder,
        kind=kind,
        step=step,
        base_model=info.get("base_model") or train.get("pretrained_model_name_or_path"),
        token=info.get("token"),
        run=run.name or "run",
    )


def discover(path: str | os.PathLike) -> list[AdapterRef]:
    """The adapters of a run folder: each checkpoint-N/ with an adapter inside, then the final adapter
    at the top unless a checkpoint has its step. A single adapter folder gives itself."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"adapter folder not found: {root}")
    refs = []
    for child in root.iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir() and _kind(child):
            refs.append(_ref(child.name, child, root, int(m.group(1))))
    refs.sort(key=lambda r: r.step)
    if _kind(root):
        if _CKPT.match(root.name):  # a checkpoint folder given directly
            return [_ref(root.name, root, root.parent, int(_CKPT.match(root.name).group(1)))]
        final = _ref("final", root, root, None)
        if final.step is None:
            final = _ref("final", root, root, _last_logged_step(root))
        if final.step is None or final.step not in {r.step for r in refs}:
            refs.append(final)
    if not refs:
        raise ValueError(
            f"no adapter in {root}: expected checkpoint-N/ folders or {diffusion.CONFIG_NAME} / {LORA_FILE}"
        )
    return refs


def sweep(ref: AdapterRef, deltas: list[float]) -> list[AdapterRef]:
    """One NB-LoRA adapter at several inference bounds δ' (the slider; no retraining)."""
    if ref.kind != "nblora":
        raise ValueError(f"--sweep_delta needs an NB-LoRA adapter, {ref.path} is a {ref.kind} adapter")
    return [replace(ref, name=f"{ref.name}@delta{d:g}", delta_prime=float(d)) for d in deltas]


def same_model(a: str, b: str) -> bool:
    """Two base-model references name the same model (same folder on disk, or the same hub id)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return a.rstrip("/") == b.rstrip("/")


def check_base_model(ref: AdapterRef, base_model: str) -> None:
    if ref.base_model is not None and not same_model(ref.base_model, base_model):
        raise ValueError(
            f"{ref.path} was trained on base model {ref.base_model!r}, not {base_model!r} "
            "(pass --allow_other_base to score it anyway)"
        )


def clear(pipe) -> None:
    """Remove every adapter from the pipeline (base weights untouched)."""
    if diffusion.adapted_components(pipe):
        diffusion.remove_adapter(pipe, merge=False)
    if getattr(pipe, "get_list_adapters", None) and any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()


def apply(pipe, ref: AdapterRef) -> None:
    """Load one adapter onto a clean pipeline."""
    clear(pipe)
    if ref.kind == "nblora":
        diffusion.load_adapter(pipe, ref.path)
        if ref.delta_prime is not None:
            diffusion.set_norm_bound(pipe, delta_prime=ref.delta_prime)
    else:
        try:
            pipe.load_lora_weights(str(ref.path))
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            clear(pipe)
            raise ValueError(
                f"cannot load LoRA {ref.path / LORA_FILE}: {' '.join(str(e).split())[:300]}"
            ) from None
