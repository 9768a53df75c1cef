"""The factor cache never serves stale factors: fused and 8-bit-style optimizers, direct sub-layer calls,
gradient accumulation, non-reentrant gradient checkpointing, DDP, loads and hand edits."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from nblora_diffusion import NBLoRAConfig, inject_nblora, unload_nblora
from nblora_diffusion.core import nblora_layers

from layer_helpers import fresh_delta_weight, make_layer, randomize

ATOL = 1e-12  # float64 throughout: batched and per-layer factors agree to rounding


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.to_q, self.to_v = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.to_v(torch.tanh(self.to_q(self.norm(x))))


class Net(nn.Module):
    """Two blocks, optionally under non-reentrant gradient checkpointing (as diffusers and transformers)."""

    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.head = nn.Linear(8, 3)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.head(x)


class DataWriteAdam(torch.optim.Optimizer):
    """Writes its updates through ``.data``, so no version counter moves: what bitsandbytes' 8-bit Adam
    does on CUDA (its kernels write the parameters' memory directly)."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.add_(torch.sign(p.grad), alpha=-group["lr"])


def optimizers() -> dict:
    return {
        "fused_adamw": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
        "data_write_8bit_style": lambda params: DataWriteAdam(params, lr=0.1),
    }


def net(checkpointing: bool = False, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    model = Net(checkpointing).double()
    inject_nblora(model, NBLoRAConfig(rank=2, p=2, delta=1.0, target_modules=("to_q", "to_v")))
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "nblora_" in name:
                t.copy_(torch.randn_like(t) * 0.5)
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [t for n, t in model.named_parameters() if "nblora_" in n]


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output with every update recomputed from the parameters (plain-autograd Cayley, no cache)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in nblora_layers(ref):
            layer.base_layer.weight += fresh_delta_weight(layer)
        unload_nblora(ref, merge=False)
        return ref(x)


def inputs(seed: int = 3) -> torch.Tensor:
    return torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- optimizers that bypass version counters ------------------------------------------------------
@pytest.mark.parametrize("make_opt", list(optimizers().values()), ids=list(optimizers()))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_grad_forward_between_backward_and_step_does_not_hide_the_step(make_opt, mode):
    model = net().train(mode == "train")
    opt = make_opt(adapter_parameters(model))
    x = inputs()
    for _ in range(2):
        model(x).square().mean().backward()
        with torch.no_grad():
            model(x)  # an evaluation forward before the update: fills the eval-mode cache
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            assert torch.allclose(model(x), reference(model, x), rtol=0, atol=ATOL)


@pytest.mark.parametrize("make_opt", list(optimizers().values()), ids=list(optimizers()))
def test_stand_alone_layer_in_eval_mode_sees_every_step(make_opt):
    layer = randomize(make_layer()).eval()
    opt = make_opt(list(layer.parameters()))
    x = torch.randn(3, 5, dtype=torch.float64)
    for _ in range(2):
        layer(x).square().sum().backward()
        with torch.no_grad():
            layer(x)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            expected = layer.base_layer(x) + x @ fresh_delta_weight(layer).T
            assert torch.allclose(layer(x), expected, rtol=0, atol=ATOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' 8-bit Adam runs on CUDA")
def test_bitsandbytes_8bit_adam_step_is_seen_by_the_next_forward():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = net().float().cuda().eval()
    opt = bnb.optim.AdamW8bit(adapter_parameters(model), lr=0.1)
    x = inputs().float().cuda()
    model(x).square().mean().backward()
    with torch.no_grad():
        before = model(x)
    opt.step()
    with torch.no_grad():
        after = model(x)
        assert not torch.allclose(after, before)
        assert torch.allclose(after, reference(model, x), atol=1e-4)


# -- direct calls, accumulation, checkpointing, DDP ---------------------------------------------------
@pytest.mark.parametrize("step", [False, True], ids=["before_step", "after_fused_step"])
def test_sub_layer_called_directly_after_the_models_backward_builds_its_own_graph(step):
    model = net()
    opt = torch.optim.AdamW(adapter_parameters(model), lr=0.1, fused=True)
    x = inputs()
    model(x).square().mean().backward()
    if step:
        opt.step()
    opt.zero_grad()
    layer = model.blocks[0].to_q
    alone = copy.deepcopy(layer)  # the same adapter outside any model: computes its own factors
    layer(x).square().sum().backward()  # reusing the model's factors would backward a freed graph
    alone(x).square().sum().backward()
    for (name, t), t_alone in zip(layer.named_parameters(), alone.parameters(), strict=True):
        if t.requires_grad:
            assert torch.allclose(t.grad, t_alone.grad, rtol=0, atol=ATOL), name


def test_gradient_accumulation_with_evaluations_between_micro_batches_matches_the_per_layer_path():
    model = net()
    plain = copy.deepcopy(model)
    del plain.forward  # the class's forward: every layer computes its own factors
    del plain.nblora_materializer
    opts = [torch.optim.AdamW(adapter_parameters(m), lr=0.1, fused=True) for m in (model, plain)]
    for step in range(2):
        for micro in range(2):
            x = inputs(seed=10 * step + micro)
            for m in (model, plain):
                (m(x).square().mean() / 2).backward()
            with torch.no_grad():
                model.eval()(x)  # an evaluation between micro-batches
                model.train()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        x = inputs()
        with torch.no_grad():
            assert torch.allclose(model.eval()(x), plain(x), rtol=0, atol=ATOL)
            model.train()
    for a, b in zip(adapter_parameters(model), adapter_parameters(plain), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_non_reentrant_checkpointing_gives_the_gradients_of_the_plain_forward():
    models = [net(checkpointing=True), net(checkpointing=False)]
    opts = [torch.optim.AdamW(adapter_parameters(m), lr=0.1, fused=True) for m in models]
    for step in range(3):
        x = inputs(seed=step)
        for m in models:
            m(x).square().mean().backward()
        for a, b in zip(adapter_parameters(models[0]), adapter_parameters(models[1]), strict=True):
            assert torch.allclose(a.grad, b.grad, rtol=0, atol=ATOL)
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.fixture
def process_group():
    """A one-process gloo group: DDP's real wrapper and hooks, without spawning processes."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_training_with_evaluations_matches_the_unwrapped_model(process_group):
    model, twin = net(), net()
    ddp = DistributedDataParallel(model)
    opts = [torch.optim.AdamW(adapter_parameters(m), lr=0.1, fused=True) for m in (model, twin)]
    for step in range(3):
        x = inputs(seed=step)
        for m in (ddp, twin):
            m(x).square().mean().backward()
        with torch.no_grad():
            ddp.eval()(x)  # evaluation between backward and step
            ddp.train()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            assert torch.allclose(ddp.eval()(x), twin.eval()(x), rtol=0, atol=ATOL)
            ddp.train(), twin.train()


# -- loads and hand edits ---------------------------------------------------------------------------
def test_load_state_dict_refreshes_the_eval_cache():
    model, source = net().eval(), net(seed=1).eval()
    x = inputs()
    with torch.no_grad():
        model(x)
        model.load_state_dict(source.state_dict())
        assert torch.allclose(model(x), source(x), rtol=0, atol=ATOL)


def test_edits_through_data_are_seen_after_forget_factors_or_a_mode_switch():
    model = net().eval()
    x = inputs()
    layer = model.blocks[1].to_v
    for refresh in (layer.forget_factors, model.eval):
        with torch.no_grad():
            model(x)
            layer.nblora_B.data.add_(0.3)  # no version counter moves
            refresh()
            assert torch.allclose(model(x), reference(model, x), rtol=0, atol=ATOL)


def test_model_deep_copies_and_pickles_right_after_a_training_forward():
    model = net()
    x = inputs()
    model(x).square().mean().backward()
    twin = copy.deepcopy(model)  # the cached factors of that forward carry a graph: copies start empty
    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for other in (twin, restored):
            assert torch.allclose(other(x), model(x), rtol=0, atol=ATOL)
