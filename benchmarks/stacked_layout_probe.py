"""What NB-LoRA's compiled step would cost with each group's tensors stored as one stacked parameter.

A design probe, not the product's layout: the adapters' tensors live in the layers (Ã, B̃, s̃, δ and the
slider per layer), so a compiled step stacks them, returns each layer's gradient as a view of its group's
buffer and steps 168 tensors on the tiny UNet (PEFT LoRA: 112). Here the same NB-LoRA, copied from an
injected UNet, keeps Ã, B̃, s̃, δ and the slider of each group of one shape as (L, ...) tensors (9
trainable tensors in 3 groups) and runs the same batched Cayley and bounds (``cayley_transposed_groups``,
``bound_vector``); each adapted layer reads its row of its group's factors. The probe first checks that its
output and gradients equal the injected UNet's (eager), then times the three compiled steps back to back in
alternating order and prints the medians of the paired ratios to PEFT's (compile_bench's step and settings).

    python benchmarks/stacked_layout_probe.py [--pairs 100] [--check-only]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys

import torch
import torch.nn.functional as F
from compile_bench import TINY_UNET, adapted_unet, make_step, timed
from torch import nn

from nblora_diffusion.core.bounds import bound_vector
from nblora_diffusion.core.cayley import cayley_transposed_groups
from nblora_diffusion.core.inject import nblora_layers, unload_nblora
from nblora_diffusion.training.optim import make_optimizer

from common import ADAMW, machine


class Row(nn.Module):
    """The frozen base layer plus row ``index`` of its group's factors (set by ``Stacked.forward``)."""

    def __init__(self, base: nn.Linear, factors: dict, group: int, index: int) -> None:
        super().__init__()
        self.base, self.factors, self.group, self.index = base, factors, group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors[self.group]
        return self.base(x) + F.linear(F.linear(x, A[self.index]), B[self.index])


class Stacked(nn.Module):
    """A copy of an NB-LoRA-injected model (parameterization II) with each group's tensors stacked."""

    def __init__(self, injected: nn.Module) -> None:
        super().__init__()
        self.groups: dict[tuple, list[str]] = {}  # batch_key -> the names of its layers
        layers = dict(nblora_layers(injected))
        for name, layer in layers.items():
            self.groups.setdefault(layer.batch_key(), []).append(name)
        members = [[layers[n] for n in names] for names in self.groups.values()]
        self.p = [ls[0].p for ls in members]
        A, B, s, self.delta, self.scale = (  # δ and the slider: constant in this probe
            [torch.stack([getattr(layer, n).detach() for layer in ls]) for ls in members] for n in _TENSORS
        )
        self.A, self.B, self.s = nn.ParameterList(A), nn.ParameterList(B), nn.ParameterList(s)
        self.model, self.factors = unload_nblora(copy.deepcopy(injected), merge=False), {}
        for g, names in enumerate(self.groups.values()):
            for i, name in enumerate(names):
                parent, _, child = name.rpartition(".")
                base = self.model.get_submodule(name)
                setattr(self.model.get_submodule(parent), child, Row(base, self.factors, g, i))

    def forward(self, *args, **kwargs):
        outs = cayley_transposed_groups([[A, B] for A, B in zip(self.A, self.B, strict=True)])
        for g, (A, Bt) in enumerate(outs):
            gain = 2.0 * bound_vector(self.s[g], self.p[g], self.delta[g].unsqueeze(-1))
            self.factors[g] = (A, (Bt * (gain * self.scale[g].unsqueeze(-1)).unsqueeze(-1)).mT)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.factors.clear()


_TENSORS = ("nblora_A", "nblora_B", "nblora_s", "nblora_delta", "nblora_scale")


def check_equal(injected: nn.Module, stacked: Stacked) -> float:
    """Largest relative difference of the output and of Ã's gradients (eager, float32)."""
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    outs = [model(x, torch.tensor([500]), c).sample for model in (injected, stacked)]
    for out in outs:
        out.square().mean().backward()
    outs = [out.detach() for out in outs]
    worst = float((outs[0] - outs[1]).abs().max() / outs[0].abs().max())
    for names, A in zip(stacked.groups.values(), stacked.A, strict=True):
        mine = torch.stack([injected.get_submodule(n).nblora_A.grad for n in names])
        worst = max(worst, float((mine - A.grad).abs().max() / mine.abs().max()))
    return worst


def injected_unet(optimizer: str = "adamw_fused"):
    """compile_bench's NB-LoRA UNet with every B̃ moved off 0 (at init W = 0, so the check would
    compare the base model with itself)."""
    unet, opt = adapted_unet("nblora", TINY_UNET, 4, torch.device("cpu"), torch.float32, optimizer)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in nblora_layers(unet):
            layer.nblora_B.copy_(torch.randn(layer.nblora_B.shape, generator=g) * 0.1)
    return unet, opt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100, help="paired compiled steps (at least 2)")
    parser.add_argument("--check-only", action="store_true", help="only check equality with the product")
    args = parser.parse_args(argv)
    if args.pairs < 2:
        parser.error(f"--pairs must be at least 2 (quartiles of the pairs), got {args.pairs}")
    device, dtype = torch.device("cpu"), torch.float32
    models = {"nblora": injected_unet()}
    stacked = Stacked(models["nblora"][0])
    worst = check_equal(models["nblora"][0], stacked)
    counts = [sum(p.requires_grad for p in m.parameters()) for m in (models["nblora"][0], stacked)]
    print(f"machine: {machine(device)}")
    print(
        f"trainable tensors: {counts[0]} in the layers, {counts[1]} stacked; "
        f"largest relative difference {worst:.2e}"
    )
    if worst > 1e-5:
        print(f"error: the stacked copy does not compute the injected model's NB-LoRA ({worst:.2e})")
        return 1
    if args.check_only:
        return 0
    for model in (models["nblora"][0], stacked):
        model.zero_grad(set_to_none=True)
    params = [p for p in stacked.parameters() if p.requires_grad]
    models["stacked"] = (stacked, make_optimizer("adamw_fused", params, **ADAMW))
    models["lora"] = adapted_unet("lora", TINY_UNET, 4, device, dtype, "adamw_fused")
    steps = {
        k: make_step(torch.compile(m), opt, TINY_UNET, 16, device, dtype) for k, (m, opt) in models.items()
    }
    for kind, step in steps.items():
        print(f"  {kind:8s}: first compiled step {timed(step, device):.1f} s", flush=True)
        for _ in range(3):
            step()
    ratios: dict[str, list[float]] = {"nblora": [], "stacked": []}
    for i in range(args.pairs):
        times = {k: timed(steps[k], device) for k in (list(steps) if i % 2 == 0 else reversed(list(steps)))}
        for kind, values in ratios.items():
            values.append(times[kind] / times["lora"])
    for kind, values in ratios.items():
        q = statistics.quantiles(values, n=4)
        print(
            f"compiled {kind} / PEFT LoRA, median of {args.pairs} paired ratios: {q[1]:.3f} "
            f"(quartiles {q[0]:.3f}, {q[2]:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
