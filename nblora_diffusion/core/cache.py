"""FactorCache: where an adapter's factors (lora_A, lora_B) live between their computation and their use.

Two kinds of entries, with explicit lifetimes instead of a key on tensor identity:

- ``current``: the factors (slider included) the model's forward computed first, in batches, for the
  forward in progress (with an autograd graph when training). They serve the adapters while that forward
  runs, and during the backward pass (non-reentrant gradient checkpointing recomputes adapted layers
  there and must see the same tensors). An adapter called on its own, outside the hooked model's
  forward, computes its own.
- ``frozen``: detached factors without the slider (and their dtype-cast copies with it) for eval-mode
  forwards without gradients, eager mode only; the model's forward fills them in batches. An entry is
  dropped by every optimizer step (a global step post-hook: fused AdamW and 8-bit optimizers included,
  which update parameters without bumping their version counters), by every forward with gradients
  through the hooked model, by ``train()``/``eval()``, ``load_state_dict`` and the adapter's own
  setters. As a safety net for hand edits (``p.add_(...)`` under ``no_grad``), an entry also lapses when
  a tensor's version counter moved; edits through ``.data`` are invisible to it: call
  ``forget_factors()`` on the layer (or ``model.eval()`` again) after those.

Under ``torch.compile`` nothing is cached across calls: the factors are recomputed inside the graph, so
the compiled code reads no counters and never recompiles when they move.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_generation = 0  # optimizer steps seen so far, by any torch.optim.Optimizer
_step_hook = None  # the handle of the global optimizer step post-hook, registered once


def _count_step(*_args, **_kwargs) -> None:
    global _generation
    _generation += 1


def watch_optimizer_steps() -> None:
    """Register (once per process) the global optimizer step post-hook that expires frozen factors."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_step)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (gradient checkpointing recomputes there)."""
    return torch._C._current_graph_task_id() != -1


class Frozen(NamedTuple):
    stamp: tuple  # (optimizer steps, version counters, dtype, device) when computed
    factors: tuple  # detached (lora_A, lora_B), slider not applied
    applied: tuple | None = None  # (dtype, scale, lora_A, lora_B·scale) cast for one input dtype


class FactorCache:
    """The factors of a group of adapters: one injected model (slot = the layer's place in it) or one
    stand-alone layer. Holds tensors only, no references to the layers."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current: list | None = None  # per slot: factors of the hooked forward in progress, or None
        self.open = False  # the hooked model's forward is running
        self.frozen: list[Frozen | None] = [None] * size  # per slot: eval-mode, no-grad factors

    # Copies and pickles start empty: the entries are derived data, and `current` may hold tensors of
    # a graph, which deepcopy refuses (copy.deepcopy(model) right after a training forward)
    def __deepcopy__(self, memo: dict) -> FactorCache:
        return FactorCache(self.size)

    def __getstate__(self) -> dict:
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])

    # -- the forward in progress ------------------------------------------------------------------
    def begin(self, current: list, with_graph: bool) -> None:
        """Called by the model's forward with the factors it computed (None where it did not)."""
        self.current = current
        self.open = True
        if with_graph:  # a forward with gradients comes before parameter updates, by whatever means
            self.frozen = [None] * self.size

    def end(self) -> None:
        self.open = False
        if torch.compiler.is_compiling():
            # compiled graphs recompute inside themselves what checkpointing needs: keeping the factors
            # would only make them extra outputs of the graph
            self.current = None

    def current_factors(self, slot: int) -> tuple | None:
        if self.current is None:
            return None
        if self.open or (not torch.compiler.is_compiling() and in_backward()):
            return self.current[slot]
        return None

    # -- eval-mode factors ------------------------------------------------------------------------
    @staticmethod
    def stamp(tensors: tuple[torch.Tensor, ...]) -> tuple | None:
        """What a frozen entry must still match; None (never cache) for inference tensors, which have
        no version counter."""
        try:
            versions = tuple([t._version for t in tensors])
        except RuntimeError:
            return None
        return _generation, versions, tensors[0].dtype, tensors[0].device

    def frozen_entry(self, slot: int, stamp: tuple | None) -> Frozen | None:
        entry = self.frozen[slot]
        return entry if entry is not None and stamp is not None and entry.stamp == stamp else None

    def store(self, slot: int, entry: Frozen) -> None:
        if entry.stamp is not None:
            self.frozen[slot] = entry

    def forget(self, slot: int | None = None) -> None:
        """Drop the frozen factors of one slot (or all)."""
        if slot is None:
            self.frozen = [None] * self.size
        else:
            self.frozen[slot] = None
