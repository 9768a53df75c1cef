"""The one injection mechanism: wrap matching nn.Linear modules of any model in NBLoRALinear.

Injection also wraps the model's forward so that every adapter's factors are materialised first, in
batches: stacked per group of layers of the same shape and bound type (``NBLoRALinear.batch_key``), the
Cayley transforms of all groups of one rank in one call, instead of one small computation per layer.
Besides ``forward`` it adds one attribute to the model, ``model.nblora_materializer``
(``MATERIALIZER_ATTR``; like diffusers' ``peft_config``): the materializer, which holds the model's layers
in injection order and their factor cache; and one submodule, ``model.nblora_stacks``, where the layers'
tensors are stored, stacked per group (``core/stacks.py``). Each layer keeps the NBLoRAConfig it was
injected with (``layer.config``; its resolved bound is the layer's own ``nblora_delta``), so
``injected_configs`` reads the configs from the layers. ``unload_nblora`` removes all of it.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .bounds import matrix_schatten_norm
from .cache import FactorCache
from .config import NBLoRAConfig
from .layer import NBLoRALinear
from .stacks import STACKS_ATTR, Factors, NBLoRAStacks, stacked_factors

MATERIALIZER_ATTR = "nblora_materializer"  # the one attribute injection adds


def matches(name: str, targets: Iterable[str]) -> bool:
    """Path-boundary match: 'to_q' matches 'a.b.to_q' but not 'a.b.xto_q'."""
    return any(name == t or name.endswith("." + t) for t in targets)


def nblora_layers(model: nn.Module) -> Iterator[tuple[str, NBLoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, NBLoRALinear):
            yield name, module


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def materialize(layers: Sequence[NBLoRALinear], *, scaled: bool = True) -> list[Factors]:
    """The factors of many adapters: one ``stacked_factors`` call for the groups of layers with the same
    ``batch_key()`` (one per need of a graph), instead of one small computation per layer.

    Factors of layers that need a graph (training) carry one; the others are computed without
    gradients. The per-layer path computes the same values (``NBLoRALinear.compute_factors``).
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        groups[(layer._needs_graph(), layer.batch_key())].append(i)
    factors: list = [None] * len(layers)
    for graph in (True, False):
        members = [m for (needs, _), m in groups.items() if needs == graph]
        if not members:
            continue
        with torch.set_grad_enabled(graph):
            stacks = stacked_factors([[layers[i] for i in m] for m in members], scaled=scaled)
        for group, (A, B) in zip(members, stacks, strict=True):
            for i, A_i, B_i in zip(group, A.unbind(0), B.unbind(0), strict=True):
                factors[i] = (A_i, B_i)
    return factors


def _forward_factors(layers: list[NBLoRALinear], cache: FactorCache) -> None:
    """The model forward's first work, in batches: the factors of every live adapter for this forward,
    and the frozen entries of eval-mode adapters whose entries are not valid."""
    live = [slot for slot, layer in enumerate(layers) if not (layer.merged or layer._skipped())]
    direct = [slot for slot in live if not layers[slot]._caches()]
    current: list = [None] * len(layers)
    for slot, factors in zip(direct, materialize([layers[i] for i in direct]), strict=True):
        current[slot] = factors
    cache.begin(current, with_graph=any(f[0].requires_grad or f[1].requires_grad for f in current if f))
    stale = [layers[slot] for slot in live if layers[slot]._caches() and not layers[slot]._frozen_valid()]
    for layer, factors in zip(stale, materialize(stale, scaled=False), strict=True):
        layer._freeze(factors)


class _Materializer:
    """Installed as the model's ``forward``: the factors of every adapter first, in batches, then the
    model's own forward. A forward pre-hook would do the same work in eager mode, but torch.compile runs
    the hooks of the module it compiles as a graph of their own; inside ``forward`` the batched Cayley
    calls are traced into the model's one graph."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model.__dict__.get("forward")  # a forward installed on the instance before us, if any
        functools.update_wrapper(self, model.forward)  # the signature that callers inspect (Trainer)
        self.layers: list[NBLoRALinear] = []  # in injection order
        self.cache = FactorCache(0)

    def bind(self, layers: list[NBLoRALinear]) -> None:
        """Take ``layers`` (all of the model's, in injection order): their factor cache, and their
        tensors stored in groups under ``model.nblora_stacks`` (rebuilt from their current values)."""
        self.layers, self.cache = layers, FactorCache(len(layers))
        for slot, layer in enumerate(layers):
            layer.factor_cache, layer.factor_slot = self.cache, slot
        if STACKS_ATTR in self.model._modules:
            delattr(self.model, STACKS_ATTR)
        if layers:
            setattr(self.model, STACKS_ATTR, NBLoRAStacks(layers))

    def __call__(self, *args, **kwargs):
        _forward_factors(self.layers, self.cache)
        try:
            if self.inner is not None:
                return self.inner(*args, **kwargs)
            return type(self.model).forward(self.model, *args, **kwargs)
        finally:
            self.cache.end()

    # A bound method's two attributes: wrappers that re-bind ``model.forward.__func__`` to the model
    # (accelerate's mixed precision, and its unwrap_model) then call ``_forward_with_factors(model, ...)``
    @property
    def __func__(self):
        return _forward_with_factors

    @property
    def __self__(self) -> nn.Module:
        return self.model


def _forward_with_factors(model: nn.Module, *args, **kwargs):
    hook = model.__dict__.get(MATERIALIZER_ATTR)
    if hook is None:  # unloaded while another wrapper still calls us
        return type(model).forward(model, *args, **kwargs)
    return hook(*args, **kwargs)


def inject_nblora(model: nn.Module, config: NBLoRAConfig) -> list[str]:
    """Replace every nn.Linear named by ``config.target_modules`` with an NBLoRALinear.

    Returns the replaced module names. Raises ValueError if nothing matches, if a match is not an
    nn.Linear, or if a match already carries an adapter, or if the model holds a submodule with
    adapters of its own. Only adapter parameters stay trainable for the replaced layers; the rest of the
    model is left as it was. The model's adapter tensors are stored anew (``model.nblora_stacks``, with
    their current values) at every injection: build the optimizer after the last one.
    """
    if not isinstance(config, NBLoRAConfig):
        raise ValueError(f"config must be an NBLoRAConfig, got {type(config).__name__}")
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, config.target_modules)]
    if not found:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules {list(config.target_modules)}"
        )
    inside = {n for n, _ in nblora_layers(model)}
    stored = getattr(model, STACKS_ATTR, None)
    own_groups = {id(g) for g in stored.groups} if isinstance(stored, NBLoRAStacks) else set()
    for name, layer in nblora_layers(model):
        if layer._home is not None and id(layer._home[0]) not in own_groups:
            raise ValueError(
                f"{name!r} holds an adapter injected into a submodule of this model: inject into one "
                "model (or unload that one first)"
            )
    replaced = []
    for name, module in found:
        if isinstance(module, NBLoRALinear) or any(name.startswith(p + ".") for p in inside):
            raise ValueError(f"module {name!r} already has an NB-LoRA adapter (inject once per module)")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name!r} is a {type(module).__name__}, NB-LoRA wraps nn.Linear only")
    layers = []  # all layers are built before any is swapped in: a bad match leaves the model untouched
    grad_flags = [(t, t.requires_grad) for _, module in found for t in module.parameters()]
    try:
        for name, module in found:
            if config.gamma is not None:
                delta = config.gamma * float(matrix_schatten_norm(module.weight.detach(), config.p))
                if delta <= 0:
                    raise ValueError(f"relative bound for {name!r} is 0: its base weight is zero")
            else:
                delta = config.delta
            try:
                layers.append(
                    NBLoRALinear(
                        module,
                        config.rank,
                        config.p,
                        delta,
                        config.parameterization,
                        config.dropout,
                        config.init_std,
                        config=config,
                    )
                )
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    except ValueError:
        for t, flag in grad_flags:  # NBLoRALinear froze the base weights it wrapped
            t.requires_grad_(flag)
        raise
    for (name, _), layer in zip(found, layers, strict=True):
        _set_submodule(model, name, layer)
        replaced.append(name)
    hook = getattr(model, MATERIALIZER_ATTR, None)
    if hook is None:
        hook = _Materializer(model)
        model.forward = hook
        setattr(model, MATERIALIZER_ATTR, hook)
    present = [layer for _, layer in nblora_layers(model)]
    alive = {id(layer) for layer in present}
    earlier = [layer for layer in hook.layers if id(layer) in alive]  # injection order, then the new ones
    known = {id(layer) for layer in earlier}
    hook.bind(earlier + [layer for layer in present if id(layer) not in known])
    return replaced


def injected_configs(model: nn.Module) -> list[dict]:
    """The NBLoRAConfig dicts the model's layers were injected with, each once, in injection order."""
    hook = getattr(model, MATERIALIZER_ATTR, None)
    layers = hook.layers if hook is not None else [layer for _, layer in nblora_layers(model)]
    configs: list[dict] = []
    for layer in layers:
        d = layer.config.to_dict() if layer.config is not None else None
        if d is not None and d not in configs:
            configs.append(d)
    return configs


def unload_nblora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain nn.Linear layers back (with the update merged in if ``merge``) and the model's forward."""
    for name, layer in list(nblora_layers(model)):
        if merge and not layer.merged:
            layer.merge(keep_base=False)  # the layer goes: no copy to give back
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    hook = getattr(model, MATERIALIZER_ATTR, None)
    if hook is not None:
        hook.bind(
            []
        )  # a wrapper installed over ours (accelerate's autocast) may keep calling it: a pass-through
        if model.__dict__.get("forward") is hook:
            del model.forward
            if hook.inner is not None:
                model.forward = hook.inner
        delattr(model, MATERIALIZER_ATTR)
    return model


def set_nblora_scale(model: nn.Module, scale: float) -> None:
    """Scale every adapter's bound (and singular values) by ``scale``: the inference slider."""
    for _, layer in nblora_layers(model):
        layer.scale = scale


def merge_nblora(model: nn.Module) -> None:
    for _, layer in nblora_layers(model):
        if not layer.merged:
            layer.merge()


def unmerge_nblora(model: nn.Module) -> None:
    for _, layer in nblora_layers(model):
        if layer.merged:
            layer.unmerge()
