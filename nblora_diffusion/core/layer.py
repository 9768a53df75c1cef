"""NBLoRALinear: a frozen nn.Linear plus a norm-bounded low-rank update.

Both parameterizations reduce to three factors, W = P_out · diag(g) · P_inᵀ:
  II (default, paper eq. 8): [Aᵀ; Bᵀ] = Cayley([Ãᵀ; B̃ᵀ]), P_in = Aᵀ, P_out = Bᵀ, g = 2s.
  I  (paper §3.2):           P_in = Cayley(Ṽ), P_out = Cayley(Ũ), g = clamp(d̃, -s, s).
The layer works with them as the LoRA pair W = lora_B · lora_A, lora_A = P_inᵀ (r, in) with orthonormal
rows and lora_B = P_out · diag(g) (out, r): forward, delta_weight, merge and export all go through it.
``stacked_factors`` (core/stacks.py) computes the pair for groups of layers at once; a single layer is a
group of one. Once injected, a layer's tensors are rows of its group's stored stacks (core/stacks.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import p_label
from .bounds import bound_vector, check_delta, fit_bound, parse_p, project_to_ball, s_tilde_for, schatten_norm
from .cache import FactorCache, Frozen, watch_optimizer_steps
from .cayley import cayley_sign_flip, inverse_cayley
from .config import NBLoRAConfig, check_dropout, check_parameterization, check_rank
from .stacks import BUFFERS, Factors, stacked_factors, tensor_names


def _forget_after_load(layer: NBLoRALinear, incompatible_keys) -> None:
    layer.forget_factors()  # load_state_dict post-hook: the tensors hold new values


class NBLoRALinear(nn.Module):
    """y = base_layer(x) + 2·((x Aᵀ) S) B with every singular value of the update bounded by s."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        p: float | str = math.inf,
        delta: float = 1.0,
        parameterization: str = "II",
        dropout: float = 0.0,
        init_std: float | None = None,
        *,
        config: NBLoRAConfig | None = None,
    ) -> None:
        super().__init__()
        self._home: tuple[nn.Module, int] | None = None  # (stored group, row) once injected: core/stacks.py
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"NB-LoRA wraps nn.Linear layers, got {type(base_layer).__name__}")
        m, n = base_layer.out_features, base_layer.in_features
        check_rank(rank, at_most=("min(out, in)", min(m, n)))
        check_parameterization(parameterization)
        check_dropout(dropout)
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.config = config  # the NBLoRAConfig inject_nblora built this layer from (None: built by hand)
        self.in_features, self.out_features = n, m
        self.rank, self.p, self.parameterization = rank, parse_p(p), parameterization
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base_layer.weight
        kw = {"device": w.device, "dtype": torch.float64 if w.dtype == torch.float64 else torch.float32}
        self.register_buffer("nblora_delta", torch.tensor(check_delta(delta), **kw))
        # "Ã small random, B̃ = 0": the Cayley image then has B = 0, so W = 0 at init (paper §3.1)
        std = init_std if init_std is not None else 1.0 / math.sqrt(n)
        if parameterization == "II":
            self.nblora_A = nn.Parameter(torch.randn(rank, n, **kw) * std)  # Ã (r, n)
            self.nblora_B = nn.Parameter(torch.zeros(rank, m, **kw))  # B̃ (r, m)
        else:
            self.nblora_U = nn.Parameter(torch.randn(m, rank, **kw) * (1.0 / math.sqrt(m)))  # Ũ (m, r)
            self.nblora_V = nn.Parameter(torch.randn(n, rank, **kw) * std)  # Ṽ (n, r)
            self.nblora_d = nn.Parameter(torch.zeros(rank, **kw))  # d̃ (r,): d = 0 -> W = 0
        self.nblora_s = nn.Parameter(torch.zeros(rank, **kw))  # s̃ (r,): uniform split of δ
        self.merged = False
        self._base_copy: torch.Tensor | None = None  # CPU copy of the unmerged base weight (merge keep_base)
        self._scale = 1.0  # the slider, read by eager code; the buffer is its copy for compiled graphs
        # (a tensor whose value changes never makes torch.compile recompile; a Python float would)
        self.register_buffer("nblora_scale", torch.tensor(1.0, **kw), persistent=False)
        self.factor_cache, self.factor_slot = FactorCache(1), 0  # inject_nblora shares one per model
        self.register_load_state_dict_post_hook(_forget_after_load)
        watch_optimizer_steps()
        self.train(base_layer.training)  # an adapter injected into a model in eval mode starts in eval mode

    # -- factors --------------------------------------------------------------------------------
    @property
    def delta(self) -> float:
        return float(self.nblora_delta)

    def batch_key(self) -> tuple:
        """Layers with equal keys form one group of ``stacked_factors``."""
        s = self._stored()[-1]  # δ: the dtype and device of all the layer's tensors, and no row view made
        return (
            self.parameterization,
            self.rank,
            self.in_features,
            self.out_features,
            self.p,
            s.dtype,
            s.device,
        )

    def compute_factors(self, *, scaled: bool = True, fused: bool = True) -> Factors:
        """(lora_A, lora_B) of this layer alone: a batch of one (see ``stacked_factors``)."""
        ((A, B),) = stacked_factors([[self]], scaled=scaled, fused=fused)
        return A[0], B[0]

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self._stored()[:-1])

    def _stored(self) -> list[torch.Tensor]:
        """The tensors this layer's trainable tensors and δ live in: its own, or its stored group's."""
        owner = self if self._home is None else self._home[0]
        return [getattr(owner, n) for n in (*tensor_names(self.parameterization), "nblora_delta")]

    def _skipped(self) -> bool:
        """Scale 0 gives the base model: eager code skips the update (compiled graphs keep it, at 0,
        so that moving the slider does not recompile them)."""
        return not torch.compiler.is_compiling() and self._scale == 0.0

    def _caches(self) -> bool:
        """Whether this forward may use the frozen (eval-mode, no-grad, eager) factors."""
        return not self.training and not torch.compiler.is_compiling() and not self._needs_graph()

    def _stamp(self) -> tuple | None:
        return FactorCache.stamp(tuple(self._stored()))

    def _frozen_valid(self) -> bool:
        return self.factor_cache.frozen_entry(self.factor_slot, self._stamp()) is not None

    def _frozen(self) -> Frozen:
        entry = self.factor_cache.frozen_entry(self.factor_slot, self._stamp())
        if entry is None:
            with torch.no_grad():
                entry = self._freeze(self.compute_factors(scaled=False))
        return entry

    def _freeze(self, factors: Factors) -> Frozen:
        """Store factors without the slider as this layer's frozen entry (the model's forward fills
        them in batches)."""
        entry = Frozen(self._stamp(), tuple(f.detach() for f in factors))
        self.factor_cache.store(self.factor_slot, entry)
        return entry

    def forget_factors(self) -> None:
        """Drop the cached factors: needed only after editing the adapter's tensors through ``.data``."""
        self.factor_cache.forget(self.factor_slot)

    def train(self, mode: bool = True) -> NBLoRALinear:
        self.forget_factors()  # parameters may have been edited in any way while in the other mode
        return super().train(mode)

    def factors(self) -> Factors:
        """lora_A (r, in) with orthonormal rows and lora_B (out, r), the slider included:
        ``delta_weight() == lora_B @ lora_A``. From the model's batched pass for this forward, from the
        eval-mode cache, or computed here (see ``core/cache.py`` for when each applies)."""
        if self._caches():
            A, B = self._frozen().factors
            return A, B * self._scale
        current = self.factor_cache.current_factors(self.factor_slot)
        if current is None or (
            not (current[0].requires_grad or current[1].requires_grad) and self._needs_graph()
        ):
            return self.compute_factors()
        return current

    # -- storage: the layer's own tensors, or its row of a stored group (core/stacks.py) --------------
    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (Ã, B̃, s̃ or Ũ, Ṽ, d̃, s̃): the layer's own, or once injected its
        rows of its group's stacks (views: writes to them land in the stacks)."""
        return {n: getattr(self, n) for n in tensor_names(self.parameterization)}

    def stack_into(self, group: nn.Module, index: int) -> None:
        """From now on this layer's tensors are row ``index`` of ``group``'s stacks."""
        for n in tensor_names(self.parameterization):
            self._parameters.pop(n, None)
        for n in BUFFERS:
            self._buffers.pop(n, None)
            self._non_persistent_buffers_set.discard(n)
        self._home = (group, index)
        self.forget_factors()

    def __getattr__(self, name: str):
        home = self.__dict__.get("_home")
        if home is not None and name in home[0].row_names:
            return getattr(home[0], name)[home[1]]
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._home is not None:  # the keys and order of a layer that owns its tensors
            for n in (*tensor_names(self.parameterization), "nblora_delta"):
                t = getattr(self, n)
                destination[prefix + n] = t if keep_vars else t.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self._home is None:
            return
        keys = {prefix + n: n for n in (*tensor_names(self.parameterization), "nblora_delta")}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in keys]
        for key, n in keys.items():
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value, row = state_dict[key], getattr(self, n)
            if not isinstance(value, torch.Tensor) or value.shape != row.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                    f"the shape in current model is {tuple(row.shape)}."
                )
                continue
            with torch.no_grad():
                row.copy_(value)

    # -- public API -----------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        """Multiplies the bound (and every singular value of the update): the inference slider."""
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"scale must be a finite number >= 0, got {value}")
        if self.merged:  # one state machine: re-merged as it was merged (with or without the base copy)
            keep = self._base_copy is not None
            self.unmerge()
            self._set_scale(value)
            self.merge(keep_base=keep)
        else:
            self._set_scale(value)

    def _set_scale(self, value: float) -> None:
        self._scale = value
        with torch.no_grad():
            self.nblora_scale.fill_(value)

    def bound_vector_unscaled(self) -> torch.Tensor:
        return bound_vector(self.nblora_s, self.p, self.nblora_delta)

    def bound_vector(self) -> torch.Tensor:
        """Bounds s (r,) on the singular values of the update, runtime scale included."""
        return self.bound_vector_unscaled() * self._scale

    def delta_weight(self) -> torch.Tensor:
        """The update W, shape (out, in), in the adapter's dtype (float32 or float64)."""
        A, B = self.factors()
        return B @ A  # (m, r) @ (r, n) -> (m, n)

    def merge(self, keep_base: bool | None = None) -> None:
        """Add the update into the base weight. ``keep_base`` keeps a CPU copy of the base weight, so that
        ``unmerge`` (and slider moves while merged) give it back exactly; by default only for fp16/bf16
        weights (in fp32 the subtraction's error is ~1e-7 relative)."""
        if self.merged:
            raise ValueError("adapter is already merged")
        w = self.base_layer.weight
        keep = keep_base if keep_base is not None else w.dtype != torch.float32
        with torch.no_grad():
            self._base_copy = w.detach().to("cpu", copy=True) if keep else None
            w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("adapter is not merged")
        with torch.no_grad():
            w = self.base_layer.weight
            if self._base_copy is not None:  # exact, whatever the rounding of the addition
                w.copy_(self._base_copy)
                self._base_copy = None
            else:
                w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self._skipped():
            return y
        if self._caches():
            A, B = self._applied(x.dtype)
            return y + F.linear(F.linear(x, A), B)
        A, B = self.factors()
        dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        if A.dtype != dtype:
            A, B = A.to(dtype), B.to(dtype)
        return y + F.linear(F.linear(self.dropout(x), A), B)  # (..., n) -> (..., r) -> (..., m)

    def _applied(self, dtype: torch.dtype) -> Factors:
        """Cached (lora_A, lora_B·scale) in the input dtype: two matmuls per inference forward."""
        entry = self._frozen()
        if entry.applied is None or entry.applied[:2] != (dtype, self._scale):
            A, B = entry.factors
            applied = (dtype, self._scale, A.to(dtype).contiguous(), (B * self._scale).to(dtype))
            entry = entry._replace(applied=applied)
            self.factor_cache.store(self.factor_slot, entry)
        return entry.applied[2], entry.applied[3]

    def extra_repr(self) -> str:
        p = p_label(self.p)
        return f"rank={self.rank}, p={p}, delta={self.delta:g}, parameterization={self.parameterization}"

    # -- completeness: any bounded W is reachable (paper Appendix A-B) --------------------------
    @torch.no_grad()
    def set_delta_weight(self, W: torch.Tensor, project: bool = False) -> dict:
        """Set the free parameters so that ``delta_weight()`` equals W.

        W must have rank <= r and Schatten-p norm <= δ·scale; otherwise ValueError, or with
        ``project=True`` its singular values are truncated to rank r and mapped into the bound.
        Returns a report: the norm of W, the bound, and the relative Frobenius change made.
        """
        m, n, r, p = self.out_features, self.in_features, self.rank, self.p
        if tuple(W.shape) != (m, n):
            raise ValueError(f"W must have shape {(m, n)}, got {tuple(W.shape)}")
        if self.merged:
            raise ValueError("unmerge the adapter before setting its weight")
        if self._scale == 0:
            raise ValueError("cannot set the weight of an adapter whose scale is 0")
        if not W.dtype.is_floating_point or not bool(torch.isfinite(W).all()):
            raise ValueError(
                f"W must be a finite floating-point tensor, got dtype {W.dtype} or non-finite values"
            )
        # rounding of W's own dtype is not rank or norm: numpy's matrix_rank tolerance max(m, n)·eps
        rtol = max(1e-10, max(m, n) * torch.finfo(W.dtype).eps)
        W64 = W.detach().to(torch.float64) / self._scale
        delta = float(self.nblora_delta)
        U, sigma, Vh = torch.linalg.svd(W64, full_matrices=False)
        tol = rtol * max(float(sigma[0]) if sigma.numel() else 0.0, 1e-300)
        norm_all = float(schatten_norm(sigma, p))
        if sigma.numel() > r and float(sigma[r]) > tol and not project:
            raise ValueError(
                f"W has rank > {r} (singular value {r + 1} is {float(sigma[r]):.3g}); pass project=True"
            )
        U, sigma, V = U[:, :r], sigma[:r].clone(), Vh[:r].mT
        norm = float(schatten_norm(sigma, p))
        if norm > delta * (1 + rtol):
            if not project:
                raise ValueError(
                    f"W has Schatten-{p:g} norm {norm:.6g}, above the bound {delta:.6g} by "
                    f"{norm / delta - 1:.3%}; pass project=True to clip it onto the bound"
                )
            sigma = project_to_ball(sigma, p, delta)
        s = fit_bound(sigma, p, delta)
        sigma = torch.minimum(sigma, s)
        if self.parameterization == "II":
            theta = 0.5 * torch.asin((sigma / s).clamp(0, 1))  # 2·sin θ·cos θ·s = σ
            Q = torch.cat([V * torch.cos(theta), U * torch.sin(theta)], dim=0)  # [Aᵀ; Bᵀ] (n + m, r)
            Q = Q * cayley_sign_flip(Q[:r])  # column signs flip a_i and b_i together: W unchanged
            Fm = inverse_cayley(Q)
            self.nblora_A.copy_(Fm[:n].mT)
            self.nblora_B.copy_(Fm[n:].mT)
        else:
            sign_u, sign_v = cayley_sign_flip(U[:r]), cayley_sign_flip(V[:r])
            self.nblora_U.copy_(inverse_cayley(U * sign_u))
            self.nblora_V.copy_(inverse_cayley(V * sign_v))
            self.nblora_d.copy_(sigma * sign_u * sign_v)
        self.nblora_s.copy_(s_tilde_for(s, p))
        self.forget_factors()
        new = (U * sigma) @ V.mT
        change = float(torch.linalg.matrix_norm(new - W64) / torch.linalg.matrix_norm(W64).clamp(min=1e-300))
        return {"norm": norm_all, "bound": delta, "relative_change": change}
