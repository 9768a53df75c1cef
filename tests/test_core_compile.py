"""torch.compile of NB-LoRA models: one graph with the batched Cayley inside, no recompiles across training
steps or slider moves, compiled == eager. Tiny random models of the real architectures; ``aot_eager``
(Dynamo + AOT autograd, no code generation) except in the inductor test."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from nblora_diffusion import NBLoRAConfig, inject_nblora
from nblora_diffusion.core import nblora_layers, set_nblora_scale
from nblora_diffusion.transformer_models import adapt_model
from nblora_diffusion.transformer_models.tiny import tiny_llama_config, tiny_vit_config

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    model = CLIPTextModel(config).requires_grad_(False)
    inject_nblora(
        model, NBLoRAConfig(rank=2, p=2, delta=0.5, target_modules=("q_proj", "k_proj", "v_proj", "out_proj"))
    )
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, (ids,), lambda out: out.last_hidden_state.square().mean()


def llama():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())
    adapt_model(model, rank=2, p=2, delta=0.5)  # the "auto" preset: attention and MLP projections
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, (ids,), lambda out: out.logits.float().logsumexp(-1).mean()


def vit():
    from transformers import ViTForImageClassification

    model = ViTForImageClassification(tiny_vit_config())
    adapt_model(model, rank=2, p=3.5, delta=0.5, preset="vit-all", parameterization="I")
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, (images,), lambda out: out.logits.square().mean()


def unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=32,
    ).requires_grad_(False)  # fmt: skip
    inject_nblora(model, NBLoRAConfig(rank=4, p=2, delta=1.0, target_modules=ATTN))
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([10]), torch.randn(1, 7, 32, generator=gen))
    return model, args, lambda out: out.sample.square().mean()


ALL = [clip, llama, vit, pytest.param(unet, marks=pytest.mark.slow)]
SOME = [clip, pytest.param(llama, marks=pytest.mark.slow), pytest.param(vit, marks=pytest.mark.slow)]


def make(factory):
    torch.manual_seed(0)
    model, args, loss = factory()
    with torch.no_grad():  # a "trained" adapter: non-zero updates, inside the bound
        for name, t in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("nblora_B", "nblora_d", "nblora_s"):
                t.copy_(torch.randn_like(t) * 0.3)
    return model, args, loss


def cayley_calls(model) -> int:
    """The batched pass's calls of the Cayley op: one for all groups of layers of one rank, dtype and
    device (a group transforms [Ã, B̃] for parameterization II, Ũ and Ṽ for I)."""
    return len(
        {(layer.rank, layer.nblora_s.dtype, layer.nblora_s.device) for _, layer in nblora_layers(model)}
    )


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("factory", ALL, ids=lambda f: getattr(f, "__name__", None))
@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_compiled_model_is_one_graph_with_the_batched_cayley_inside(factory, grad):
    model, args, _ = make(factory)
    model.train(grad)
    with torch.set_grad_enabled(grad):
        report = torch._dynamo.explain(model)(*args)
    assert (report.graph_count, report.graph_break_count) == (1, 0), report.break_reasons
    # the groups of one rank share one call of the fused Cayley op, in the graph
    nodes = [n for n in report.graphs[0].graph.nodes if str(n.target).startswith("nblora.cayley.")]
    assert len(nodes) == cayley_calls(model)
    # the batched pass reads the stored stacks as they are: no stack op, no torch.stack (inductor would
    # write a loop per layer for it)
    targets = [str(n.target) for n in report.graphs[0].graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "stack" in t]


def test_stack_op_passes_the_custom_op_checks():
    gen = torch.Generator().manual_seed(0)
    runs = [
        [torch.randn(shape, dtype=torch.float64, generator=gen, requires_grad=grad) for _ in range(n)]
        for shape, n, grad in (((4, 6), 3, True), ((), 2, False), ((5,), 1, True))
    ]
    args = ([t for run in runs for t in run], [len(run) for run in runs])
    torch.library.opcheck(torch.ops.nblora.stack.default, args)
    out = torch.ops.nblora.stack.default(*args)
    assert len(out) == 3 and all(torch.equal(o, torch.stack(run)) for o, run in zip(out, runs, strict=True))
    sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()  # each input's gradient from its own stack
    assert torch.equal(runs[0][1].grad, torch.ones(4, 6, dtype=torch.float64))
    assert torch.equal(runs[2][0].grad, torch.full((5,), 3.0, dtype=torch.float64))


def train_steps(model, args, loss_fn, compiled, steps: int = 3, accumulation: int = 2) -> list:
    """Adam steps with a learning rate that changes every step and accumulated micro-batches; returns
    the gradients seen before each step."""
    params = [t for n, t in model.named_parameters() if t.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    grads = []
    for _ in range(steps):
        for _ in range(accumulation):
            (loss_fn(compiled(*args)) / accumulation).backward()
        grads.append([t.grad.clone() for t in params])
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(
    "factory", [*SOME, pytest.param(unet, marks=pytest.mark.slow)], ids=lambda f: getattr(f, "__name__", None)
)
def test_compiled_training_matches_eager_and_never_recompiles(factory):
    model, args, loss_fn = make(factory)
    twin = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    got = train_steps(model, args, loss_fn, compiled)
    expected = train_steps(twin, args, loss_fn, twin)
    assert counter.frame_count == 1  # optimizer steps, learning-rate changes, accumulation: one graph
    for step_got, step_expected in zip(got, expected, strict=True):
        for g, e in zip(step_got, step_expected, strict=True):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("factory", SOME, ids=lambda f: getattr(f, "__name__", None))
def test_slider_moves_without_recompiling(factory):
    model, args, _ = make(factory)
    model.eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for scale in (1.0, 0.5, 0.0, 1.5, 1.0):
            set_nblora_scale(model, scale)
            got = compiled(*args)[0]
            expected = model(*args)[0]  # eager, from its own cache
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), scale
    assert counter.frame_count == 1


@pytest.mark.slow
def test_inductor_compiled_training_step_matches_eager():
    """The default backend (inductor's generated code around the opaque Cayley ops) on the tiny ViT."""
    model, args, loss_fn = make(vit)
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    got = train_steps(model, args, loss_fn, compiled, steps=2, accumulation=1)
    expected = train_steps(twin, args, loss_fn, twin, steps=2, accumulation=1)
    for step_got, step_expected in zip(got, expected, strict=True):
        for g, e in zip(step_got, step_expected, strict=True):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)
