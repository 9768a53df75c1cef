"""Adaptation vs forgetting: LoRA and NB-LoRA on a tiny ViT, with a learning-rate sweep (CPU).

A ViT (transformers ViTForImageClassification, random init, 8×8 inputs) is pretrained on the
scikit-learn digits 0–4 (the source task, logits 0–4 of the head). It is then adapted to digits 5–9
(the target task, logits 5–9) with low-rank adapters on every attention and MLP projection of the
backbone, while the head rows of the target task train in full (rows 0–4 get no gradient). Source
accuracy after adaptation measures forgetting caused by the backbone update alone.

Methods: LoRA (peft) and NB-LoRA (p = 1, 2, inf; relative bounds γ: ‖ΔW‖_Sp <= γ‖W_p‖_Sp per layer),
each over a learning-rate sweep. Reported: target and source accuracy, and the largest per-layer norm
ratios ‖ΔW‖/‖W_p‖ (Frobenius and spectral). Plots: the adaptation/forgetting frontier and accuracy vs
learning rate (the shape of the paper's Table 2: LoRA degrades at high lr, NB-LoRA stays stable).

    python examples/forgetting.py            # full sweep, writes examples/results/
    python examples/forgetting.py --quick    # LoRA vs one NB-LoRA at two learning rates (tests)
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from example_utils import pyplot, require_positive, save_figure, torch_threads, write_results
from torch import nn

from nblora_diffusion.transformer_models import adapt_model, make_tiny_vit, merge_and_unload

RESULTS = Path(__file__).resolve().parent / "results"
# every Linear of the ViT blocks (transformers >= 5 names); the head is trained in full
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
SOURCE, TARGET = 0, 1  # task ids: digits 0-4 use logits 0-4, digits 5-9 use logits 5-9


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, 1, 8, 8) in [-1, 1]
    y: torch.Tensor  # (N,) digit labels


def load_data(seed: int = 0) -> dict[str, Split]:
    """scikit-learn's bundled digits, a stratified 70/30 split, then by task."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    x = torch.tensor(X, dtype=torch.float32).view(-1, 1, 8, 8) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    y = torch.tensor(y)
    tr, te = train_test_split(torch.arange(len(y)), test_size=0.3, random_state=seed, stratify=y)
    out = {}
    for split, idx in (("train", tr), ("test", te)):
        for task, mask in ((SOURCE, y[idx] < 5), (TARGET, y[idx] >= 5)):
            out[f"{split}{task}"] = Split(x[idx][mask], y[idx][mask])
    return out


def task_logits(model: nn.Module, x: torch.Tensor, task: int) -> torch.Tensor:
    logits = model(pixel_values=x).logits  # (B, 10)
    return logits[:, 5 * task : 5 * task + 5]  # (B, 5): this task's head rows


def train(
    model: nn.Module, data: Split, task: int, lr: float, epochs: int, batch: int, seed: int = 0
) -> float:
    """Adam on the trainable parameters; returns the mean loss of the last epoch (nan if it diverged)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)  # no weight decay: head rows of the other task stay untouched
    model.train()
    last = []
    for _ in range(epochs):
        last = []
        for b in torch.randperm(len(data.y), generator=g).split(batch):
            loss = F.cross_entropy(task_logits(model, data.x[b], task), data.y[b] - 5 * task)
            if not torch.isfinite(loss):
                return math.nan
            opt.zero_grad()
            loss.backward()
            opt.step()
            last.append(loss.item())
    return sum(last) / len(last)


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, task: int) -> float:
    model.eval()
    pred = task_logits(model, data.x, task).argmax(-1)
    return float((pred == data.y - 5 * task).float().mean())


def pretrain(data: dict[str, Split], epochs: int, seed: int, folder: Path):
    """Random tiny ViT saved and reloaded through from_pretrained, then trained on the source task."""
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(make_tiny_vit(folder / "vit-random", seed=seed))
    train(model, data["train0"], SOURCE, lr=3e-3, epochs=epochs, batch=64, seed=seed)
    return model


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS
    }


def norm_ratios(base: dict[str, torch.Tensor], merged: nn.Module) -> dict[str, float]:
    """Largest per-layer ‖ΔW‖/‖W_p‖ over the adapted layers, Frobenius and spectral."""
    modules = dict(merged.named_modules())
    fro, spec = [], []
    for name, W0 in base.items():
        dW = modules[name].weight.detach() - W0
        fro.append(float(torch.linalg.matrix_norm(dW) / torch.linalg.matrix_norm(W0)))
        spec.append(float(torch.linalg.matrix_norm(dW, 2) / torch.linalg.matrix_norm(W0, 2)))
    return {"frobenius_ratio": max(fro), "spectral_ratio": max(spec)}


def adapt(
    pretrained: nn.Module, data: dict[str, Split], method: dict, lr: float, epochs: int, rank: int, seed: int
) -> dict:
    """One adaptation run from a copy of the pretrained model; returns its metrics."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = copy.deepcopy(pretrained)
    base = _base_weights(model)
    if method["adapter"] == "lora":
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=list(TARGETS), modules_to_save=["classifier"]
        )
        model = get_peft_model(model, config)
    else:
        adapt_model(model, rank=rank, p=method["p"], gamma=method["gamma"], preset=TARGETS)
        model.classifier.requires_grad_(True)  # the head trains in full, as peft's modules_to_save
    loss = train(model, data["train1"], TARGET, lr, epochs, batch=64, seed=seed)
    row = {
        **method,
        "lr": lr,
        "final_loss": loss,
        "target_acc": accuracy(model, data["test1"], TARGET),
        "source_acc": accuracy(model, data["test0"], SOURCE),
    }
    merged = model.merge_and_unload() if method["adapter"] == "lora" else merge_and_unload(model)
    row.update(norm_ratios(base, merged))
    return row


def method_name(m: dict) -> str:
    if m["adapter"] == "lora":
        return "LoRA"
    p = "∞" if m["p"] == "inf" else m["p"]
    return f"NB-LoRA p={p} γ={m['gamma']}"


def run(
    methods: list[dict], lrs: list[float], pretrain_epochs: int, epochs: int, rank: int, seed: int
) -> dict:
    data = load_data(seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = pretrain(data, pretrain_epochs, seed, Path(tmp))
    results = {
        "pretrained": {"source_acc": accuracy(model, data["test0"], SOURCE), "target_acc_chance": 0.2},
        "rank": rank,
        "epochs": epochs,
        "runs": [],
    }
    print(f"pretrained source accuracy {results['pretrained']['source_acc']:.3f}", flush=True)
    for method in methods:
        for lr in lrs:
            row = adapt(model, data, method, lr, epochs, rank, seed)
            results["runs"].append(row)
            print(
                f"{method_name(method):<22} lr={lr:<7g} target {row['target_acc']:.3f}  "
                f"source {row['source_acc']:.3f}  ‖ΔW‖_F/‖W‖_F {row['frobenius_ratio']:.3f}  "
                f"‖ΔW‖_2/‖W‖_2 {row['spectral_ratio']:.3f}",
                flush=True,
            )
    return results


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    runs = results["runs"]
    names = list(dict.fromkeys(method_name(r) for r in runs))
    gammas = sorted({r["gamma"] for r in runs if r["adapter"] == "nblora"})
    cmaps = {1: plt.cm.Blues, 2: plt.cm.Greens, "inf": plt.cm.Oranges}  # one hue per p, darker = larger γ
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name in names:
        rows = [r for r in runs if method_name(r) == name]
        if name == "LoRA":
            style = dict(color="black", marker="s", lw=2)
        else:
            shade = 0.45 + 0.5 * gammas.index(rows[0]["gamma"]) / max(1, len(gammas) - 1)
            style = dict(color=cmaps.get(rows[0]["p"], plt.cm.Greys)(shade), marker="o", lw=1)
        lrs = [r["lr"] for r in rows]
        axes[0].plot(
            [r["target_acc"] for r in rows],
            [r["source_acc"] for r in rows],
            label=name,
            **{**style, "ls": "none"},
        )
        axes[1].semilogx(lrs, [r["target_acc"] for r in rows], label=name, **style)
        axes[2].semilogx(lrs, [r["source_acc"] for r in rows], label=name, **style)
    axes[0].axhline(results["pretrained"]["source_acc"], color="gray", lw=0.8)
    axes[0].set(
        xlabel="target accuracy (digits 5–9)",
        ylabel="source accuracy (digits 0–4)",
        title="adaptation / forgetting frontier (points: lr sweep)",
    )
    axes[1].set(xlabel="learning rate", ylabel="target accuracy", title="adaptation vs learning rate")
    axes[2].set(xlabel="learning rate", ylabel="source accuracy", title="forgetting vs learning rate")
    axes[2].axhline(results["pretrained"]["source_acc"], color="gray", lw=0.8)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="LoRA vs one NB-LoRA at two learning rates (tests)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the plot")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny model: 1 is fastest)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_positive(rank=args.rank, threads=args.threads)
    if args.quick:
        methods = [{"adapter": "lora"}, {"adapter": "nblora", "p": 2, "gamma": 0.5}]
        lrs, pretrain_epochs, epochs = [1e-3, 1e-1], 12, 6
    else:
        methods = [{"adapter": "lora"}] + [
            {"adapter": "nblora", "p": p, "gamma": g} for p in (1, 2, "inf") for g in (0.25, 0.5, 1.0)
        ]
        lrs, pretrain_epochs, epochs = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 40, 10
    with torch_threads(args.threads):
        results = run(methods, lrs, pretrain_epochs, epochs, args.rank, args.seed)
    name = "forgetting_quick" if args.quick else "forgetting"
    write_results(results, args.out, name)
    plot(results, args.out / f"{name}.png")
    return results


if __name__ == "__main__":
    main()
