"""The one injection mechanism: wrap matching nn.Linear modules of any model in NBLoRALinear.

Injection also installs a forward pre-hook on the model that materialises every adapter's factors
in batched Cayley calls, one per (q, r) shape group, instead of one small call per layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .bounds import matrix_schatten_norm
from .cayley import cayley
from .config import NBLoRAConfig
from .layer import NBLoRALinear

_HOOK_ATTR = "_nblora_materializer"


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


def materialize(layers: Iterable[NBLoRALinear]) -> None:
    """Compute the factors of many adapters with one batched Cayley call per shape group.

    Layers that need a graph (training) get fresh factors stashed for this forward; frozen or
    no-grad layers whose cache was never filled get it filled. The per-layer path computes the same
    values (``NBLoRALinear.compute_factors``).
    """
    graph, cached = [], []
    for layer in layers:
        if layer.merged or layer.scale == 0.0:
            continue
        if layer._needs_graph():
            graph.append(layer)
        elif layer._cache is None:
            cached.append(layer)
    if graph:
        _batched(graph, stash=True)
    if cached:
        with torch.no_grad():
            _batched(cached, stash=False)


def _batched(layers: list[NBLoRALinear], stash: bool) -> None:
    inputs = [layer.cayley_inputs() for layer in layers]
    groups: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
    for i, mats in enumerate(inputs):
        for j, F in enumerate(mats):
            groups[(tuple(F.shape), F.dtype, F.device)].append((i, j))
    outputs: list[list] = [[None] * len(mats) for mats in inputs]
    for members in groups.values():
        Q = cayley(torch.stack([inputs[i][j] for i, j in members]))  # (L, q, r)
        for (i, j), Qi in zip(members, Q.unbind(0)):
            outputs[i][j] = Qi
    for layer, outs in zip(layers, outputs):
        factors = layer.factors_from(outs)
        layer.set_stash(factors) if stash else layer.set_cache(factors)


class _Materializer:
    def __init__(self) -> None:
        self.layers: list[NBLoRALinear] = []
        self.handle = None
        self.configs: list[dict] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        materialize(self.layers)


def inject_nblora(model: nn.Module, config: NBLoRAConfig) -> list[str]:
    """Replace every nn.Linear named by ``config.target_modules`` with an NBLoRALinear.

    Returns the replaced module names. Raises ValueError if nothing matches, if a match is not an
    nn.Linear, or if a match already carries an adapter. Only adapter parameters stay trainable
    for the replaced layers; the rest of the model is left as it was.
    """
    if not isinstance(config, NBLoRAConfig):
        raise ValueError(f"config must be an NBLoRAConfig, got {type(config).__name__}")
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, config.target_modules)]
    if not found:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules {list(config.target_modules)}")
    inside = {n for n, _ in nblora_layers(model)}
    replaced = []
    for name, module in found:
        if isinstance(module, NBLoRALinear) or any(name.startswith(p + ".") for p in inside):
            raise ValueError(f"module {name!r} already has an NB-LoRA adapter (inject once per module)")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target {name!r} is a {type(module).__name__}, NB-LoRA wraps nn.Linear only")
    for name, module in found:
        if config.gamma is not None:
            delta = config.gamma * float(matrix_schatten_norm(module.weight.detach(), config.p))
            if delta <= 0:
                raise ValueError(f"relative bound for {name!r} is 0: its base weight is zero")
        else:
            delta = config.delta
        try:
            layer = NBLoRALinear(module, config.rank, config.p, delta, config.parameterization, config.dropout,
                                 config.init_std)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        _set_submodule(model, name, layer)
        replaced.append(name)
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is None:
        hook = _Materializer()
        hook.handle = model.register_forward_pre_hook(hook)
        object.__setattr__(model, _HOOK_ATTR, hook)
    hook.layers = [layer for _, layer in nblora_layers(model)]
    hook.configs.append(config.to_dict())
    return replaced


def injected_configs(model: nn.Module) -> list[dict]:
    hook = getattr(model, _HOOK_ATTR, None)
    return list(hook.configs) if hook is not None else []


def unload_nblora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain nn.Linear layers back (with the update merged in if ``merge``) and remove the hook."""
    for name, layer in list(nblora_layers(model)):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is not None:
        hook.handle.remove()
        object.__delattr__(model, _HOOK_ATTR)
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
