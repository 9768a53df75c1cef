"""Groups of layers: their tensors stored as one (L, ...) tensor per group, and their factors computed
in one pass (``stacked_factors``).

``inject_nblora`` moves the tensors of each group of L layers with the same ``batch_key()`` (and the
same trainable flags) into one ``StackedGroup``: Ã, B̃ (II) or Ũ, Ṽ, d̃ (I), s̃, δ and the slider, each
stacked over the group's layers. The model's batched forward (``stacked_factors``) then reads each
group's stacks as they are, with no copy, and an optimizer steps a few tensors per group of layers
instead of a few per layer: in a compiled training step that is what NB-LoRA paid over a plain LoRA
(BENCHMARKS.md). The groups hang under the model as ``model.nblora_stacks`` (``STACKS_ATTR``), so
``model.parameters()``, ``.to()``, DDP and the optimizers see them like any parameter; their names
end with the tensor's (``nblora_stacks.groups.0.nblora_A``), as the per-layer names did.

Each layer keeps its row: ``layer.nblora_A`` is row i of its group's stack (a view, whose writes land
in the stack), and the model's state dict keeps the per-layer keys (``<layer>.nblora_A``): the groups
write none of their own, the layers write and load their rows. Saved adapters, exports and
``load_state_dict`` do not see the storage. A layer built on its own keeps its own parameters (a
group of one for ``stacked_factors``). Writes go through the stacks, so freeze or unfreeze adapters
with ``model.nblora_stacks.requires_grad_(...)`` (or the model's), not per layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .bounds import bound_vector
from .cayley import cayley_transposed_groups, split_runs

if TYPE_CHECKING:
    from .layer import NBLoRALinear

Factors = tuple[torch.Tensor, torch.Tensor]  # lora_A (r, n), lora_B (m, r): W = lora_B @ lora_A

STACKS_ATTR = "nblora_stacks"  # the submodule injection adds to the model
BUFFERS = ("nblora_delta", "nblora_scale")  # per-layer buffers; the slider's copy is not persistent


_TENSOR_NAMES = {  # per parameterization
    "II": ("nblora_A", "nblora_B", "nblora_s"),
    "I": ("nblora_U", "nblora_V", "nblora_d", "nblora_s"),
}


def tensor_names(parameterization: str) -> tuple[str, ...]:
    """The trainable tensors of a layer of this parameterization, in their order in the state dict."""
    return _TENSOR_NAMES[parameterization]


class StackedGroup(nn.Module):
    """The tensors of L layers, each stacked over them; writes no state dict of its own."""

    def __init__(self, rows: Sequence[dict[str, torch.Tensor]], names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)  # the trainable tensors
        self.row_names = frozenset((*names, *BUFFERS))  # what a layer reads as its row
        with torch.no_grad():
            for name in names:
                stack = torch.stack([row[name].detach() for row in rows])
                self.register_parameter(name, nn.Parameter(stack, requires_grad=rows[0][name].requires_grad))
            for name in BUFFERS:
                stack = torch.stack([row[name].detach() for row in rows])
                self.register_buffer(name, stack, persistent=name != "nblora_scale")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        pass  # the layers write their rows under their own keys

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        pass  # the layers load their rows


class NBLoRAStacks(nn.Module):
    """All groups of one injected model (``groups[k]``: a ``StackedGroup``)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        groups: dict[tuple, list] = defaultdict(list)
        for layer in layers:
            names = tensor_names(layer.parameterization)
            tensors = {**layer.adapter_tensors(), **{n: getattr(layer, n) for n in BUFFERS}}
            flags = tuple(tensors[n].requires_grad for n in names)
            groups[(layer.batch_key(), flags)].append((layer, tensors))
        self.groups = nn.ModuleList()
        for members in groups.values():
            names = tensor_names(members[0][0].parameterization)
            group = StackedGroup([tensors for _, tensors in members], names)
            for index, (layer, _) in enumerate(members):
                layer.stack_into(group, index)
            self.groups.append(group)


# Inside a compiled graph all the stacks of a ``stacked_factors`` call are one opaque op: inductor would
# generate a loop per layer for each (on CPU, thousands of lines of C++ for the tiny UNet's adapters: a
# tenth of its compile time), to run what one ATen call does; one call rather than one per stack, as
# each call of a Python-defined op costs ~15 µs. Its backward is an unbind: views, no kernel.
@torch.library.custom_op("nblora::stack", mutates_args=())
def _stack_op(tensors: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    """torch.stack of consecutive runs of ``tensors``, ``counts[k]`` of them for stack k."""
    return [torch.stack(run) for run in split_runs(tensors, counts)]


@_stack_op.register_fake
def _(tensors: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    return [run[0].new_empty(len(run), *run[0].shape) for run in split_runs(tensors, counts)]


def _unstack(ctx, grads: list) -> tuple:
    return [g for grad, n in zip(grads, ctx.counts, strict=True) for g in _unbind(grad, n)], None


def _unbind(grad: torch.Tensor | None, count: int) -> list:
    return [None] * count if grad is None else list(grad.unbind(0))


def _save_counts(ctx, inputs, output) -> None:
    ctx.counts = inputs[1]


_stack_op.register_autograd(_unstack, setup_context=_save_counts)


def stacked_factors(
    groups: Sequence[Sequence[NBLoRALinear]], *, scaled: bool = True, fused: bool = True
) -> list[Factors]:
    """lora_A (L, r, n) and lora_B (L, m, r) of each group of L layers sharing ``batch_key()``.

    Every tensor of the computation is a stack over a group's layers: its Cayley inputs (II: [Ã, B̃];
    I: Ũᵀ and Ṽᵀ), the bounds, the gains and the product with them; the Cayley transforms of all
    groups of one rank run in one call (``cayley_transposed_groups``). ``scaled``: lora_B includes the
    slider (each layer's ``nblora_scale``). ``fused=False`` uses the plain-autograd Cayley (a reference
    for tests).
    """
    own = [
        ("nblora_A", "nblora_B") if ls[0].parameterization == "II" else ("nblora_U", "nblora_V", "nblora_d")
        for ls in groups
    ]
    names = [(*o, "nblora_s", "nblora_delta", *(("nblora_scale",) if scaled else ())) for o in own]
    flat = iter(_stacks(groups, names))
    stacks = [{name: next(flat) for name in ns} for ns in names]  # per group: name -> (L, ...) stack
    inputs = []
    for t in stacks:
        if "nblora_A" in t:
            inputs.append([t["nblora_A"], t["nblora_B"]])  # [Ã, B̃] -> [A, B]
        else:
            inputs += [[t["nblora_U"].mT], [t["nblora_V"].mT]]  # Uᵀ, Vᵀ
    outs = iter(cayley_transposed_groups(inputs, fused=fused))
    factors = []
    for layers, t in zip(groups, stacks, strict=True):
        s = bound_vector(t["nblora_s"], layers[0].p, t["nblora_delta"].unsqueeze(-1))
        if "nblora_A" in t:
            P_in_t, P_out_t = next(outs)  # lora_A = A, lora_B = Bᵀ·2S
            g = 2.0 * s
        else:
            ((P_out_t,), (P_in_t,)) = next(outs), next(outs)  # Uᵀ (L, r, m), Vᵀ (L, r, n)
            g = torch.minimum(torch.maximum(t["nblora_d"], -s), s)  # d projected into [-s, s]
        if scaled:
            g = g * t["nblora_scale"].unsqueeze(-1)
        factors.append((P_in_t, (P_out_t * g.unsqueeze(-1)).mT))  # lora_B = P_out·diag(g)
    return factors


def _stacks(groups: Sequence[Sequence[NBLoRALinear]], names: Sequence[Sequence[str]]) -> list[torch.Tensor]:
    """The tensors ``names[g]`` of group g's layers, each stacked over the group: the stored stacks
    themselves (or a slice) for layers that are consecutive rows of one ``StackedGroup``,
    else a stack of the layers' own tensors (a layer alone: views; in a compiled graph all of them one
    call of the stack op)."""
    out: list = []
    runs = []
    for layers, ns in zip(groups, names, strict=True):
        stored = _stored_rows(layers)
        for n in ns:
            if stored is not None:
                group, rows = stored
                t = getattr(group, n)
                out.append(t if rows == slice(0, len(t)) else t[rows])
            else:
                out.append(None)
                runs.append([getattr(layer, n) for layer in layers])
    if not runs:
        return out
    if torch.compiler.is_compiling():
        stacked = iter(_stack_op([t for run in runs for t in run], [len(run) for run in runs]))
    else:
        stacked = iter([run[0].unsqueeze(0) if len(run) == 1 else torch.stack(run) for run in runs])
    return [t if t is not None else next(stacked) for t in out]


def _stored_rows(layers: Sequence[NBLoRALinear]) -> tuple[nn.Module, slice] | None:
    """(group, rows) when the layers are the consecutive rows ``rows`` of one stored group."""
    homes = [layer._home for layer in layers]
    if homes[0] is None or any(h is None or h[0] is not homes[0][0] for h in homes):
        return None
    first = homes[0][1]
    if [h[1] for h in homes] != list(range(first, first + len(homes))):
        return None
    return homes[0][0], slice(first, first + len(homes))
