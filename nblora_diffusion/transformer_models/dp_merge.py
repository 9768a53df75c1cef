"""Differentially private merging of adapters trained on separate data (paper §4.3).

K adapters W_1..W_K for the same base weights W_p are merged as

    W = W_p + (1/K)·Σ_k W_k + σ·B·η,    η ~ N(0, I) entrywise,

where B is an a-priori Frobenius bound that every admissible W_k satisfies whatever data it was
trained on. NB-LoRA gives B by construction (``frobenius_bound``); a plain LoRA update is first
projected onto the norm ball. Privacy (Gaussian DP, Dong, Roth & Su 2022): the mean has sensitivity
B/K when one adapter is replaced by the zero update and 2B/K when it is replaced by any other
admissible adapter, so the merged model is μ-GDP with μ = 1/(Kσ) (resp. 2/(Kσ)) with respect to each
W_k, hence at least 1/σ-GDP for K >= 2 under either notion. Works for any nn.Module: an LLM, a ViT
or a diffusion UNet (e.g. several subjects' adapters).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core import nblora_layers, unload_nblora
from ..core.bounds import parse_p, project_to_ball, schatten_norm
from ..core.config import check_rank


def frobenius_bound(p: float | str, delta: float, rank: int) -> float:
    """A-priori bound B on ‖W‖_F of any rank-r update with Schatten-p norm at most δ.

    ‖W‖_F = ‖σ‖_2 over the r singular values. For p <= 2, ‖σ‖_2 <= ‖σ‖_p <= δ (monotonicity of
    ℓp norms), attained by a rank-1 update. For p > 2, Hölder with exponents p/2 and p/(p-2) gives
    Σσ_i² <= (Σσ_i^p)^(2/p)·r^(1-2/p), i.e. ‖σ‖_2 <= δ·r^(1/2-1/p), attained by r equal singular values
    δ·r^(-1/p). Together: B = δ·r^max(0, 1/2 - 1/p); p = inf gives δ·√r.
    """
    p = parse_p(p)
    check_rank(rank)
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta >= 0):
        raise ValueError(f"norm bound delta must be a finite number >= 0, got {delta!r}")
    exponent = 0.5 if math.isinf(p) else max(0.0, 0.5 - 1.0 / p)
    return float(delta) * rank**exponent


@dataclass(frozen=True)
class LayerUpdate:
    """One adapter's update of one nn.Linear: W (out, in) and its a-priori Frobenius bound B."""

    weight: torch.Tensor
    bound: float


@torch.no_grad()
def nblora_updates(model: nn.Module) -> dict[str, LayerUpdate]:
    """The update and a-priori bound of every NB-LoRA layer of ``model`` (runtime scale included)."""
    out = {}
    for name, layer in nblora_layers(model):
        bound = frobenius_bound(layer.p, layer.delta * layer.scale, layer.rank)
        out[name] = LayerUpdate(layer.delta_weight().detach().clone(), bound)
    if not out:
        raise ValueError("model has no NB-LoRA adapters to take updates from")
    return out


def adapter_updates(model: nn.Module, folder: str | os.PathLike) -> dict[str, LayerUpdate]:
    """Updates of a saved adapter folder (``save_model_adapter`` layout) for ``model``, left as it was.

    The adapter is loaded (injected), its updates and bounds taken, and the plain layers put back
    unmerged, so K folders give the K inputs of ``dp_merge`` for the same base model.
    """
    from .io import load_model_adapter

    if any(True for _ in nblora_layers(model)):
        raise ValueError("model already has NB-LoRA adapters: pass the plain base model")
    try:
        load_model_adapter(model, folder)
        return nblora_updates(model)
    finally:
        unload_nblora(model, merge=False)


@torch.no_grad()
def project_update(W: torch.Tensor, p: float | str, delta: float, rank: int | None = None) -> LayerUpdate:
    """Map a plain (unbounded) update into {rank <= r, ‖W‖_Sp <= δ} and attach its bound.

    The singular values are truncated to ``rank`` (default: the numerical rank of W) and projected
    onto the ℓp ball of radius δ (Euclidean projection for p = 1, 2, inf).
    """
    p = parse_p(p)
    U, sigma, Vh = torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)
    if rank is None:
        rank = max(1, int((sigma > sigma.max().clamp(min=1e-300) * 1e-10).sum()))
    U, sigma, Vh = U[:, :rank], sigma[:rank], Vh[:rank]
    if float(schatten_norm(sigma, p)) > delta:
        sigma = project_to_ball(sigma, p, delta)
    weight = ((U * sigma) @ Vh).to(W.dtype if W.dtype.is_floating_point else torch.float32)
    return LayerUpdate(weight, frobenius_bound(p, delta, rank))


@torch.no_grad()
def lora_updates(
    model: nn.Module, p: float | str, delta: float, adapter_name: str = "default"
) -> dict[str, LayerUpdate]:
    """Updates of a model carrying PEFT LoRA layers (``PeftModel``, or a diffusers UNet after
    ``load_lora_weights``), each projected onto the Schatten-p ball of radius δ.

    The update comes from PEFT's own ``get_delta_weight`` (scaling, rsLoRA and patterns included);
    names are relative to the base model, as ``dp_merge`` expects for it.
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            rank = module.r[adapter_name]
            W = module.get_delta_weight(adapter_name).float()
            key = name[len("base_model.model.") :] if name.startswith("base_model.model.") else name
            out[key] = project_update(W, p, delta, rank)
    if not out:
        raise ValueError(f"model has no PEFT LoRA layers with adapter {adapter_name!r}")
    return out


@dataclass(frozen=True)
class DPMergeReport:
    num_adapters: int
    sigma: float
    scope: str  # "model": one bound for the whole adapter; "layer": one per layer
    bound: float  # B used for the noise (scope "model"); the largest per-layer B (scope "layer")
    layer_bounds: dict[str, float]  # B_l: the largest bound of any adapter at layer l
    noise_std: dict[str, float]  # σ·B actually used per layer
    mu: float  # Gaussian-DP μ w.r.t. each adapter, replaced by the zero update
    mu_replace: float  # ... replaced by any other admissible adapter (twice the sensitivity)
    mean_update_norm: dict[str, float]  # ‖(1/K)Σ_k W_k‖_F per layer (<= B_l by convexity)


@torch.no_grad()
def dp_merge(
    model: nn.Module,
    updates: Sequence[Mapping[str, LayerUpdate]],
    sigma: float,
    scope: str = "model",
    generator: torch.Generator | None = None,
) -> DPMergeReport:
    """Add (1/K)·Σ_k W_k + σ·B·η to the base weights of ``model`` in place (paper §4.3).

    ``updates``: K dicts from ``nblora_updates`` / ``lora_updates``, keyed by nn.Linear names of
    ``model`` (a missing layer counts as a zero update). ``scope="model"`` (default) uses one bound
    B = (Σ_l B_l²)^½ for the whole adapter, so the guarantee covers all layers jointly;
    ``scope="layer"`` uses B_l per layer (the guarantee then holds per layer; jointly over L layers
    μ grows by √L, which the report includes). ``model`` must hold plain nn.Linear layers at those
    names (unload adapters first).
    """
    if (
        not isinstance(sigma, (int, float))
        or isinstance(sigma, bool)
        or not math.isfinite(sigma)
        or sigma < 0
    ):
        raise ValueError(f"noise multiplier sigma must be a finite number >= 0, got {sigma!r}")
    if scope not in ("model", "layer"):
        raise ValueError(f"scope must be 'model' or 'layer', got {scope!r}")
    updates = list(updates)
    if not updates:
        raise ValueError("dp_merge needs at least one adapter's updates")
    K = len(updates)
    names = sorted({name for u in updates for name in u})
    if not names:
        raise ValueError("the adapters' updates are empty")
    modules = dict(model.named_modules())
    layer_bounds: dict[str, float] = {}
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            found = "no module" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"dp_merge target {name!r} is {found}; expected a plain nn.Linear (unload adapters first)"
            )
        for u in updates:
            if name in u and tuple(u[name].weight.shape) != tuple(module.weight.shape):
                shape = tuple(u[name].weight.shape)
                raise ValueError(
                    f"{name}: update shape {shape} does not fit weight {tuple(module.weight.shape)}"
                )
        layer_bounds[name] = max(float(u[name].bound) for u in updates if name in u)
    total = math.sqrt(sum(b * b for b in layer_bounds.values()))
    noise_std = {n: sigma * (total if scope == "model" else layer_bounds[n]) for n in names}
    mean_norm = {}
    for name in names:
        weight = modules[name].weight
        mean = sum(u[name].weight.to(torch.float64) for u in updates if name in u) / K  # (out, in)
        mean_norm[name] = float(torch.linalg.matrix_norm(mean))
        eta = torch.randn(weight.shape, generator=generator, dtype=torch.float64, device="cpu")
        weight.add_((mean.cpu() + noise_std[name] * eta).to(weight.device, weight.dtype))
    joint = 1.0 if scope == "model" else math.sqrt(len(names))
    mu = math.inf if sigma == 0 else joint / (K * sigma)
    return DPMergeReport(
        num_adapters=K,
        sigma=float(sigma),
        scope=scope,
        bound=total if scope == "model" else max(layer_bounds.values()),
        layer_bounds=layer_bounds,
        noise_std=noise_std,
        mu=mu,
        mu_replace=2 * mu,
        mean_update_norm=mean_norm,
    )
