"""Low-rank matrix completion with a nuclear-norm bound (NB-LoRA paper §4.4), on CPU.

A 150×100 matrix M* of rank 10 and nuclear norm 390 is observed on 80% of its entries with Gaussian
noise. The estimate is an NB-LoRA update of rank 20 with Schatten-1 (nuclear) norm bound δ, trained
by Adam on the observed entries, for a sweep of δ and both parameterizations (I: W = U·D·Vᵀ with d
clamped into [-s, s]; II: W = 2BᵀSA). The penalty variant fits plain rank-20 factors with
λ·‖W‖_* added to the loss. Plots: fit and test error, numerical rank, singular values.

    python examples/matrix_completion.py            # full sweep, writes examples/results/
    python examples/matrix_completion.py --quick    # small sweep (used by the tests)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from example_utils import pyplot, require_positive, save_figure, torch_threads, write_results
from torch import nn

from nblora_diffusion.core import NBLoRALinear

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Problem:
    truth: torch.Tensor  # M* (m, n), rank k, nuclear norm `nuclear`
    observed: torch.Tensor  # M* + noise on the known entries, 0 elsewhere
    known: torch.Tensor  # bool (m, n)
    nuclear: float


def make_problem(
    m: int = 150,
    n: int = 100,
    k: int = 10,
    nuclear: float = 390.0,
    unknown: float = 0.2,
    noise: float = 0.2,
    seed: int = 0,
) -> Problem:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))  # (m, k) orthonormal
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))  # (n, k) orthonormal
    sigma = torch.linspace(2.0, 1.0, k, dtype=torch.float64)
    sigma = sigma * (nuclear / sigma.sum())  # distinct singular values summing to the nuclear norm
    truth = (U * sigma) @ V.mT  # (m, k) @ (k, n) -> (m, n)
    known = torch.rand(m, n, generator=g) >= unknown
    observed = torch.where(known, truth + noise * torch.randn(m, n, generator=g, dtype=torch.float64), 0.0)
    return Problem(truth.float(), observed.float(), known, nuclear)


def numerical_rank(sv: torch.Tensor, energy: float = 0.99) -> int:
    """Smallest k whose top-k singular values hold 99% of ‖W‖_F² (robust to a small noisy tail)."""
    cum = torch.cumsum(sv.double() ** 2, 0)
    return int((cum < energy * cum[-1]).sum()) + 1


def metrics(problem: Problem, W: torch.Tensor) -> dict:
    W = W.detach()
    known, unknown = problem.known, ~problem.known
    sv = torch.linalg.svdvals(W)
    fit = torch.linalg.norm((W - problem.observed)[known]) / torch.linalg.norm(problem.observed[known])
    test = torch.linalg.norm((W - problem.truth)[unknown]) / torch.linalg.norm(problem.truth[unknown])
    return {
        "fit_error": float(fit),
        "test_error": float(test),
        "nuclear_norm": float(sv.sum()),
        "numerical_rank": numerical_rank(sv),
        "singular_values": [float(s) for s in sv[:20]],
    }


def _adam(params, loss_fn, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)  # params: tensors or param groups with their own lr
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        sched.step()


def fit_bounded(
    problem: Problem,
    delta: float,
    parameterization: str,
    rank: int = 20,
    steps: int = 1500,
    lr: float = 0.05,
    seed: int = 0,
) -> torch.Tensor:
    """NB-LoRA estimate: W with rank <= 20 and ‖W‖_* <= δ by construction (no projection step)."""
    torch.manual_seed(seed)
    m, n = problem.truth.shape
    base = nn.Linear(n, m, bias=False)
    nn.init.zeros_(base.weight)  # W_p = 0: the adapter is the whole estimate
    layer = NBLoRALinear(base, rank, p=1, delta=delta, parameterization=parameterization)
    known, target = problem.known, problem.observed

    def loss():
        return 0.5 * ((layer.delta_weight() - target)[known] ** 2).sum() / known.sum()

    free = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in free if n != "nblora_d"]}]
    if parameterization == "I":
        # d is in absolute units while every other free parameter is an angle-like quantity: its Adam
        # step is scaled by δ/r, the per-direction bound at init, so both parameterizations get the
        # same effective learning rate
        groups.append({"params": [layer.nblora_d], "lr": lr * delta / rank})
    _adam(groups, loss, steps, lr)
    with torch.no_grad():
        return layer.delta_weight()


def fit_penalized(
    problem: Problem, lam: float, rank: int = 20, steps: int = 1500, lr: float = 0.02, seed: int = 0
) -> torch.Tensor:
    """Penalty variant: plain factors W = B·A (rank 20) minimising the fit + λ·‖W‖_* (exact, by svdvals)."""
    g = torch.Generator().manual_seed(seed)
    m, n = problem.truth.shape
    A = nn.Parameter(torch.randn(rank, n, generator=g) / math.sqrt(n))  # (r, n)
    B = nn.Parameter(torch.randn(m, rank, generator=g) / math.sqrt(rank))  # (m, r)
    known, target, count = problem.known, problem.observed, problem.known.sum()

    def loss():
        W = B @ A  # (m, r) @ (r, n) -> (m, n)
        return (0.5 * ((W - target)[known] ** 2).sum() + lam * torch.linalg.svdvals(W).sum()) / count

    _adam([A, B], loss, steps, lr)
    with torch.no_grad():
        return B @ A


def run(deltas: list[float], lambdas: list[float], steps: int, seed: int = 0) -> dict:
    problem = make_problem(seed=seed)
    results: dict = {"true_nuclear_norm": problem.nuclear, "true_rank": 10, "bounded": {}, "penalized": []}
    results["truth"] = metrics(problem, problem.truth)
    for par in ("I", "II"):
        rows = []
        for delta in deltas:
            row = metrics(problem, fit_bounded(problem, delta, par, steps=steps, seed=seed))
            rows.append({"delta": delta, **row})
            print(
                f"[{par:>2}] δ={delta:6.0f}  fit {row['fit_error']:.4f}  test {row['test_error']:.4f}  "
                f"‖W‖_* {row['nuclear_norm']:6.1f}  rank {row['numerical_rank']}",
                flush=True,
            )
        results["bounded"][par] = rows
    for lam in lambdas:
        row = metrics(problem, fit_penalized(problem, lam, steps=steps, seed=seed))
        results["penalized"].append({"lambda": lam, **row})
        print(
            f"[pen] λ={lam:6.2f}  fit {row['fit_error']:.4f}  test {row['test_error']:.4f}  "
            f"‖W‖_* {row['nuclear_norm']:6.1f}  rank {row['numerical_rank']}",
            flush=True,
        )
    return results


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    true_norm = results["true_nuclear_norm"]
    for par, style in (("I", "s--"), ("II", "o-")):
        rows = results["bounded"][par]
        x = [r["delta"] for r in rows]
        axes[0].plot(x, [r["fit_error"] for r in rows], style, label=f"NB-LoRA {par}")
        axes[1].plot(x, [r["test_error"] for r in rows], style, label=f"NB-LoRA {par}")
        axes[2].plot(x, [r["numerical_rank"] for r in rows], style, label=f"NB-LoRA {par}")
        over = rows[-1]
        axes[3].semilogy(
            range(1, len(over["singular_values"]) + 1),
            over["singular_values"],
            style,
            label=f"{par}, δ={over['delta']:.0f}",
        )
    pen = results["penalized"]
    axes[1].plot(
        [r["nuclear_norm"] for r in pen], [r["test_error"] for r in pen], "^:", label="penalty (x = ‖W‖_*)"
    )
    axes[0].plot(
        [r["nuclear_norm"] for r in pen], [r["fit_error"] for r in pen], "^:", label="penalty (x = ‖W‖_*)"
    )
    axes[2].plot([r["nuclear_norm"] for r in pen], [r["numerical_rank"] for r in pen], "^:", label="penalty")
    sv = results["truth"]["singular_values"][: results["true_rank"]]
    axes[3].semilogy(range(1, len(sv) + 1), sv, "k.", label="truth")
    titles = ("fit error (known entries)", "test error (unknown entries)", "")
    for ax, title in zip(axes[:3], titles, strict=True):
        ax.axvline(true_norm, color="gray", lw=0.8)
        ax.set_xlabel("nuclear-norm bound δ")
        ax.set_title(title)
    axes[2].axhline(results["true_rank"], color="gray", lw=0.8, ls=":")
    axes[2].set_title("numerical rank (99% of ‖W‖_F²)")
    axes[3].set_title("singular values, largest δ")
    axes[3].set_xlabel("index")
    for ax in axes:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sweep and fewer steps (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and the plot")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps per fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_positive(steps=args.steps, threads=args.threads)
    if args.quick:
        deltas, lambdas, steps = [150.0, 390.0, 900.0], [1.0, 8.0], args.steps or 300
    else:
        deltas = [100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 390.0, 450.0, 550.0, 700.0, 900.0]
        lambdas, steps = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], args.steps or 1500
    with torch_threads(args.threads):
        results = run(deltas, lambdas, steps, seed=args.seed)
    name = "matrix_completion_quick" if args.quick else "matrix_completion"
    write_results(results, args.out, name)
    plot(results, args.out / f"{name}.png")
    return results


if __name__ == "__main__":
    main()
