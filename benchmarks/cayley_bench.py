"""Cayley benchmark on the 128 attention-projection adapters of an SD1.5 UNet.

Measures, in one run and on one device:
  1. fused Cayley (custom backward) vs the plain-autograd formula, forward + backward: time, memory
     kept for backward (exact: bytes of the distinct storages autograd saves, counted with
     ``torch.autograd.graph.saved_tensors_hooks``) and peak memory above the start (CUDA: the
     allocator's peak; CPU: the running sum of the profiler's allocation events);
  2. batched materialisation (what the model's forward does first: the layers stacked per group of one
     shape, the Cayley transforms of all groups in one call) vs the per-layer path, for a training step
     (forward + backward) and for filling the inference cache.

The shapes come from the real SD1.5 UNet config, built on the meta device (no weights, no download).
Times are medians of ``torch.utils.benchmark`` runs, the two sides interleaved, best of ``--repeats``.

    python benchmarks/cayley_bench.py [--ranks 4 16 64] [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile
from torch.utils.benchmark import Timer

from nblora_diffusion import NBLoRAConfig, inject_nblora
from nblora_diffusion.core import cayley, cayley_transposed_groups, materialize, nblora_layers

from common import SD15_UNET, TARGETS, add_device_option, device_of, machine, peak_bytes, synchronize


def sd15_adapters(rank: int, device: torch.device, parameterization: str = "II") -> tuple[list, list]:
    """NB-LoRA layers on the SD1.5 attention projections and their trainable tensors (stored per group);
    base weights stay on the meta device."""
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    config = NBLoRAConfig(
        rank=rank, p=2.0, delta=1.0, target_modules=TARGETS, parameterization=parameterization
    )
    inject_nblora(unet, config)
    unet.nblora_stacks.to_empty(device=device)  # the adapters' own tensors only, stored per group
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in unet.nblora_stacks.parameters():  # trained-looking values: B̃ != 0, uneven s̃
            t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1]))
        for group in unet.nblora_stacks.groups:
            group.nblora_delta.fill_(1.0)
            group.nblora_scale.fill_(1.0)
    return [layer for _, layer in nblora_layers(unet)], list(unet.nblora_stacks.parameters())


def shape_groups(layers: list) -> dict[tuple[int, int], int]:
    """(q, r) of Fᵀ = [Ã, B̃] (q = in + out) -> number of adapters, per group of layers of one shape."""
    assert all(layer.parameterization == "II" for layer in layers)
    return Counter((layer.in_features + layer.out_features, layer.rank) for layer in layers)


def median_time(fn: Callable[[], None], min_run_time: float) -> float:
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def compare_times(fns: dict[str, Callable[[], None]], repeats: int, min_run_time: float) -> dict[str, float]:
    """Best-of-``repeats`` medians, the candidates interleaved so that background load hits both."""
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], median_time(fn, min_run_time))
    return best


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs (exact)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


# -- 1. fused vs plain autograd ---------------------------------------------------------------------
def cayley_inputs_by_group(layers: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per group of layers of one shape: a leaf Fᵀ (L, r, q) and a fixed ∇Q."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for layer in layers:  # Fᵀ = [Ã, B̃] (r, q)
        Ft = torch.cat([layer.nblora_A, layer.nblora_B], dim=-1).detach()
        groups.setdefault((layer.in_features, layer.out_features, layer.rank), []).append(Ft)
    gen = torch.Generator().manual_seed(1)
    out = []
    for mats in groups.values():
        leaf = torch.stack(mats).requires_grad_()  # (L, r, q)
        out.append((leaf, torch.randn(leaf.mT.shape, generator=gen).to(leaf.device)))
    return out


def bench_cayley(inputs: list, device: torch.device, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    # F = leaf.clone().mT: a fresh input whose backward allocates nothing, like the batched path's
    # cat of stacked parameters; autograd.grad: nothing accumulates from one group to the next
    def step(fused: bool) -> Callable[[], None]:
        def run() -> None:
            for leaf, grad in inputs:
                torch.autograd.grad(cayley(leaf.clone().mT, fused=fused), leaf, grad)
            synchronize(device)

        return run

    def forward_only(fused: bool) -> Callable[[], object]:
        return lambda: [cayley(leaf.clone().mT, fused=fused) for leaf, _ in inputs]

    times = compare_times({"fused": step(True), "plain": step(False)}, args.repeats, args.min_time)
    result = {}
    for name, fused in (("fused", True), ("plain", False)):
        result[name] = {
            "time_ms": times[name] * 1e3,
            "saved_MB": saved_bytes(forward_only(fused)) / 2**20,
            "peak_MB": peak_bytes(step(fused), device) / 2**20,
        }
    return result


# -- 2. batched vs per-layer materialisation --------------------------------------------------------
def bench_materialize(
    layers: list, params: list, device: torch.device, args: argparse.Namespace
) -> tuple[dict, dict]:
    """Times (s) of the factors of all layers (training forward, forward + backward, inference fill),
    and the compute ops each dispatches."""
    gen = torch.Generator().manual_seed(2)
    tokens = [torch.randn(1, layer.in_features, generator=gen).to(device) for layer in layers]
    weights = [torch.randn(1, layer.out_features, generator=gen).to(device) for layer in layers]

    def consume(factors: list, inputs: list) -> None:
        # what a training forward does with the factors, for one token per layer: x·lora_Aᵀ·lora_Bᵀ;
        # the same ops on both sides. autograd.grad: a step starts from zeroed grads
        loss = sum(
            (torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * w).sum()
            for (A, B), x, w in zip(factors, tokens, weights, strict=True)
        )
        torch.autograd.grad(loss, inputs, allow_unused=True)
        synchronize(device)

    def batched() -> list:
        return materialize(layers)

    def per_layer() -> list:
        return [layer.compute_factors() for layer in layers]

    def fill(batch: bool) -> Callable[[], None]:
        """The first inference forward after a change: the batched pass, or each layer alone."""

        def run() -> None:
            with torch.no_grad():
                if batch:
                    materialize(layers)
                else:
                    for layer in layers:
                        layer.compute_factors()
            synchronize(device)

        return run

    # the Cayley arithmetic alone, on the blocks already stacked per group: no batching scheme can
    # make the forward faster than this on this device
    stacked = defaultdict(list)
    for layer in layers:
        stacked[(layer.in_features, layer.out_features, layer.rank)].append((layer.nblora_A, layer.nblora_B))
    kernel_inputs = [
        [torch.stack(column).detach().requires_grad_() for column in zip(*members, strict=True)]
        for members in stacked.values()
    ]

    kernel_grads = [[torch.randn(b.shape, generator=gen).to(device) for b in bs] for bs in kernel_inputs]

    def kernel_step() -> None:  # all groups in one call, as the batched pass does
        outs = [o for group in cayley_transposed_groups(kernel_inputs) for o in group]
        torch.autograd.grad(
            outs, [b for bs in kernel_inputs for b in bs], [g for gs in kernel_grads for g in gs]
        )
        synchronize(device)

    leaves = [[f.detach().requires_grad_() for f in fs] for fs in per_layer()]  # the consumer alone
    timed = {
        "forward batched": lambda: (batched(), synchronize(device)),
        "forward per-layer": lambda: (per_layer(), synchronize(device)),
        "forward kernel alone": lambda: (cayley_transposed_groups(kernel_inputs), synchronize(device)),
        "fwd+bwd kernel alone": kernel_step,
        "fwd+bwd batched": lambda: consume(batched(), params),
        "fwd+bwd per-layer": lambda: consume(per_layer(), params),
        "consumer alone": lambda: consume(leaves, [f for fs in leaves for f in fs]),
        "fill batched": fill(True),
        "fill per-layer": fill(False),
    }
    counted = [k for k in timed if "kernel" not in k and not k.startswith("fill")]
    return compare_times(timed, args.repeats, args.min_time), {k: dispatched_ops(timed[k]) for k in counted}


# ops that only make views or read metadata: no kernel runs for them on a GPU
_NO_KERNEL = {
    *("view", "_unsafe_view", "_reshape_alias", "reshape", "as_strided", "alias", "detach", "lift_fresh"),
    *("select", "slice", "narrow", "unbind", "split", "split_with_sizes", "diagonal", "permute"),
    *("transpose", "t", "mT", "expand", "expand_as", "view_as", "unsqueeze", "squeeze", "to"),
    *("empty", "empty_strided", "resolve_conj", "resolve_neg", "is_nonzero", "item", "_local_scalar_dense"),
}


def dispatched_ops(fn: Callable[[], object]) -> int:
    """Compute ops one call dispatches (innermost aten ops that are not views): on a GPU each is a
    kernel launch, the cost that dominates when, as here, every op is small."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def compute(name: str) -> bool:
        return name.startswith("aten::") and name[len("aten::") :] not in _NO_KERNEL

    return sum(
        1 for e in prof.events() if compute(e.name) and not any(compute(c.name) for c in e.cpu_children)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    add_device_option(parser)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best median counts")
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timing block")
    args = parser.parse_args(argv)
    device = device_of(args.device)
    print(f"machine: {machine(device)}")
    rows = []
    for rank in args.ranks:
        layers, params = sd15_adapters(rank, device)
        groups = shape_groups(layers)
        listing = ", ".join(f"{q}x{r}: {n}" for (q, r), n in sorted(groups.items()))
        print(f"\nr = {rank}: {len(layers)} adapters in {len(groups)} groups ({listing}, as q x r)")
        c = bench_cayley(cayley_inputs_by_group(layers), device, args)
        m, ops = bench_materialize(layers, params, device, args)
        for name in ("fused", "plain"):
            t, saved, peak = c[name]["time_ms"], c[name]["saved_MB"], c[name]["peak_MB"]
            print(
                f"  cayley {name}: {t:.2f} ms fwd+bwd, {saved:.2f} MB saved for backward, {peak:.2f} MB peak"
            )
        for name, t in m.items():
            print(f"  materialise, {name}: {t * 1e3:.2f} ms" + (f", {ops[name]} ops" if name in ops else ""))
        rows.append((rank, c, m, ops))
    print(
        "\n| r | fused/plain time | fused/plain saved | fused/plain peak "
        "| per-layer/batched forward | per-layer/batched fwd+bwd (net of consumer) | per-layer/batched fill "
        "| ceiling: per-layer/kernel alone forward (fwd+bwd) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rank, c, m, _ in rows:
        ratio = {k: c["fused"][k] / c["plain"][k] for k in ("time_ms", "saved_MB", "peak_MB")}
        net = (m["fwd+bwd per-layer"] - m["consumer alone"]) / (m["fwd+bwd batched"] - m["consumer alone"])
        print(
            f"| {rank} | {ratio['time_ms']:.2f}x | {ratio['saved_MB']:.3f}x | {ratio['peak_MB']:.3f}x "
            f"| {m['forward per-layer'] / m['forward batched']:.2f}x "
            f"| {m['fwd+bwd per-layer'] / m['fwd+bwd batched']:.2f}x ({net:.2f}x) "
            f"| {m['fill per-layer'] / m['fill batched']:.2f}x "
            f"| {m['forward per-layer'] / m['forward kernel alone']:.2f}x "
            f"({(m['fwd+bwd per-layer'] - m['consumer alone']) / m['fwd+bwd kernel alone']:.2f}x) |"
        )
    print("\n| r | compute ops dispatched, forward: per-layer / batched | fwd+bwd net of consumer |")
    print("|---|---|---|")
    for rank, _, _, ops in rows:
        fwd = f"{ops['forward per-layer']} / {ops['forward batched']}"
        net_p, net_b = (ops[f"fwd+bwd {k}"] - ops["consumer alone"] for k in ("per-layer", "batched"))
        print(
            f"| {rank} | {fwd} = {ops['forward per-layer'] / ops['forward batched']:.1f}x "
            f"| {net_p} / {net_b} = {net_p / net_b:.1f}x |"
        )
    print("targets: fused <= 0.8x time and <= 0.6x memory of autograd; batched >= 3x faster than per-layer")
    print("ceiling: the speed-up batching would give if it removed every cost but the Cayley arithmetic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
