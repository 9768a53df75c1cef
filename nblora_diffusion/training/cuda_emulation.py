"""CUDA as the memory estimate sees it, on CPU tensors: ``LiveBytes`` counts the bytes of every storage an
op creates (freed through weakref finalizers, rounded to the caching allocator's 512-byte blocks);
``cuda_autocast_policy`` casts as CUDA's autocast does (GroupNorm, LayerNorm, softmax... in float32 under
fp16/bf16); ``cuda_kernels`` makes attention a fused kernel (no N×N matrix). See ``training.memory``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive (each storage once, views share it) and their peak.

    ``track`` counts tensors made before the mode; every op output is counted when first seen and
    uncounted when its storage is freed (a weakref finalizer on the storage). ``forget`` uncounts tensors
    that leave the device (an offloaded VAE).
    """

    def __init__(self, round_to: int = 1) -> None:
        super().__init__()
        self.round_to, self.live, self.peak = round_to, 0, 0
        self._sizes: dict[int, int] = {}

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return
        n = -(-storage.nbytes() // self.round_to) * self.round_to
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def track(self, tensors) -> None:
        for t in tensors:
            self._add(t)

    def forget(self, tensors) -> None:
        for t in tensors:
            self._free(t.untyped_storage()._cdata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


# -- CUDA's autocast policy on CPU tensors ------------------------------------------------------------
# aten/src/ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE.
# Only the ops without an AutocastCPU kernel of their own are registered (the CPU lists differ).
_CUDA_AUTOCAST = {
    "lower": (
        "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d.input",
        "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm",
        "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "linalg_multi_dot",
    ),
    "fp32": (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
        "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
        "layer_norm", "native_layer_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm",
        "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
        "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
        "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
        "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
        "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
        "_upsample_bicubic2d_aa",
    ),
    "fp32_set_opt_dtype": (
        "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
        "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
    ),
}  # fmt: skip
_NO_AUTOCAST = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def _cast(x, dtype: torch.dtype):
    if _eligible(x):
        return x.to(dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def _overload(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _policy_kernel(op, policy: str) -> Callable:
    schema = op._schema.arguments
    dtype_at = next((i for i, a in enumerate(schema) if a.name == "dtype"), None)

    def kernel(*args, **kwargs):
        if policy in ("lower", "fp32"):
            to = torch.get_autocast_dtype("cpu") if policy == "lower" else torch.float32
            args, kwargs = _cast(args, to), {k: _cast(v, to) for k, v in kwargs.items()}
        elif _eligible(args[0]) and dtype_at is not None:  # compute and return float32, no input copy
            if schema[dtype_at].kwarg_only or len(args) <= dtype_at:
                if kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
            elif args[dtype_at] is None:
                args = (*args[:dtype_at], torch.float32, *args[dtype_at + 1 :])
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """CPU autocast casts as CUDA autocast does, while the context lasts (the registrations are removed)."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for policy, names in _CUDA_AUTOCAST.items():
            for name in names:
                try:
                    op = _overload(name)
                except AttributeError:  # an op this torch does not have
                    continue
                if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCPU"):
                    lib.impl(name, _policy_kernel(op, policy), "AutocastCPU")
        yield
    finally:
        lib._destroy()


class _FusedAttention(torch.autograd.Function):
    """The memory of CUDA's fused attention (flash / memory-efficient): the output and a float32
    log-sum-exp (B, H, N) forward, saved with q, k, v; backward adds a float32 accumulator of q's size
    and dq, dk, dv. Shapes only: used on fake tensors."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)  # (B, H, N, d_v)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, H, N)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del accumulator
        return dq, dk, dv


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if torch.is_autocast_enabled("cpu"):  # SDPA is a lower-precision op of CUDA autocast
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return _FusedAttention.apply(query, key, value)


@contextlib.contextmanager
def cuda_kernels() -> Iterator[None]:
    """CUDA's autocast policy and fused attention for the models run inside."""
    import unittest.mock

    patch = unittest.mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa)
    with cuda_autocast_policy(), patch:
        yield
