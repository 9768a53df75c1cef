"""torch.compile vs eager training step, NB-LoRA and PEFT LoRA side by side in one run.

One DreamBooth-style step: UNet forward on a noisy latent with text conditioning, MSE loss, backward, AdamW
on the adapter (torch's default loop, or its fused kernel with ``--optimizer adamw_fused``; the optimizer
stays eager, the UNet is compiled with ``torch.compile(unet)``, inductor by default). Both adapters wrap
the attention projections (to_q, to_k, to_v, to_out.0) at the same rank: NB-LoRA with p = 2, δ = 1 (its
batched Cayley transforms run inside the compiled graph), PEFT LoRA with lora_alpha = rank, adapters in
float32. UNets: the tiny SD's layout (default; 2 cross-attention blocks, 8 attention projections per block
pair) or the SD1.5 architecture (``--unet sd15``, random weights).

Compile time: the first compiled step minus an eager step (inductor's caches disabled, and one throwaway
compile first so that neither adapter pays for loading inductor). Step times: the fastest of ``--steps``
steps, the variants interleaved round by round in alternating order (on a shared CPU whichever runs first
in a round is measured slower). Then ``--pairs`` pairs of compiled steps, one of each adapter back to back in
alternating order: the median of the pairs' own ratios follows the VM's drifts in speed least.

    python benchmarks/compile_bench.py [--unet tiny|sd15] [--device cpu|cuda] [--rank 4] [--steps 5]
                                       [--optimizer adamw|adamw_fused] [--pairs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

from common import SD15_UNET, TARGETS, add_adapter, add_device_option, device_of, machine, synchronize
from common import make_step as common_step

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)  # nblora_diffusion/testing/tiny_sd.py's SD1.x UNet
KINDS = ("nblora", "lora")


def adapted_unet(
    kind: str, spec: dict, rank: int, device: torch.device, dtype: torch.dtype, optimizer: str = "adamw"
):
    torch.manual_seed(0)
    unet = torch.nn.Module.to(UNet2DConditionModel(**spec), device, dtype)  # diffusers' `to` warns
    unet.requires_grad_(False).train()
    return unet, add_adapter(unet, kind, rank, optimizer)


def make_step(model, optimizer, spec: dict, side: int, device: torch.device, dtype: torch.dtype):
    return common_step(model, optimizer, side, spec["cross_attention_dim"], device, dtype)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def paired_ratios(compiled: dict, pairs: int, device: torch.device) -> list[float]:
    """NB-LoRA's step time over PEFT's, one step of each back to back, in alternating order."""
    ratios = []
    for i in range(pairs):
        t = {kind: timed(compiled[kind], device) for kind in (KINDS if i % 2 == 0 else reversed(KINDS))}
        ratios.append(t["nblora"] / t["lora"])
    return ratios


def warm_up_inductor(device: torch.device) -> None:
    """Compile a throwaway model once: the first compilation of a process also loads inductor."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1)).to(device)
    torch.compile(net)(torch.randn(4, 8, device=device)).sum().backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=("tiny", "sd15"), default="tiny")
    add_device_option(parser)
    parser.add_argument(
        "--latent", type=int, default=None, help="latent side (default: tiny 16, sd15 32 CPU / 64 GPU)"
    )
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "adamw_fused"),
        default="adamw",
        help="the trainer's --optimizer for both adapters (adamw: torch's default, tensor by tensor on CPU)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (even: both orders)")
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="paired compiled steps after the rounds (default: tiny 100, sd15 10)",
    )
    parser.add_argument("--first", choices=KINDS, default="nblora", help="the adapter that compiles first")
    parser.add_argument(
        "--explain", action="store_true", help="also count graphs and breaks (torch._dynamo.explain)"
    )
    args = parser.parse_args(argv)
    device = device_of(args.device)
    spec = TINY_UNET if args.unet == "tiny" else SD15_UNET
    side = args.latent or (16 if args.unet == "tiny" else (64 if device.type == "cuda" else 32))
    dtype = torch.float16 if device.type == "cuda" and args.unet == "sd15" else torch.float32
    torch._inductor.config.force_disable_caches = True  # honest compile times, also on a rerun
    print(f"machine: {machine(device)}")
    print(
        f"{args.unet} UNet (random weights), {side}x{side} latents, batch 1, {dtype}, rank {args.rank}, "
        f"targets {TARGETS}, optimizer {args.optimizer}"
    )
    warm_up_inductor(device)
    models = {kind: adapted_unet(kind, spec, args.rank, device, dtype, args.optimizer) for kind in KINDS}
    eager = {k: make_step(unet, opt, spec, side, device, dtype) for k, (unet, opt) in models.items()}
    compiled = {
        k: make_step(torch.compile(unet), opt, spec, side, device, dtype) for k, (unet, opt) in models.items()
    }
    if args.explain:
        for kind, (unet, _) in models.items():
            x = torch.randn(1, 4, side, side, device=device, dtype=dtype)
            c = torch.randn(1, 77, spec["cross_attention_dim"], device=device, dtype=dtype)
            report = torch._dynamo.explain(unet)(x, torch.tensor([500], device=device), c)
            print(f"  {kind:6s}: {report.graph_count} graph(s), {report.graph_break_count} break(s)")
        torch._dynamo.reset()
    compile_s = {}
    for kind in KINDS if args.first == "nblora" else reversed(KINDS):
        eager[kind]()  # warm-up: AdamW state, oneDNN/cuDNN plans
        first = timed(compiled[kind], device)
        compile_s[kind] = first - timed(eager[kind], device)
        print(
            f"  {kind:6s}: first compiled step {first:7.2f} s (compile ≈ {compile_s[kind]:.2f} s)", flush=True
        )
    rounds: dict[tuple[str, str], list[float]] = {(k, m): [] for k in KINDS for m in ("eager", "compiled")}
    for r in range(args.rounds):
        for key in list(rounds) if r % 2 == 0 else list(reversed(rounds)):
            step = (eager if key[1] == "eager" else compiled)[key[0]]
            rounds[key].append(min(timed(step, device) for _ in range(args.steps)))
        print(
            f"  round {r + 1}: " + ", ".join(f"{k}/{m} {t[-1] * 1e3:.1f} ms" for (k, m), t in rounds.items())
        )
    best = {key: min(times) for key, times in rounds.items()}
    print(f"\n{'adapter':8s} {'eager ms':>10s} {'compiled ms':>12s} {'speed-up':>9s} {'compile s':>10s}")
    for kind in KINDS:
        e, c = best[(kind, "eager")], best[(kind, "compiled")]
        print(f"{kind:8s} {e * 1e3:10.2f} {c * 1e3:12.2f} {e / c:8.2f}x {compile_s[kind]:10.2f}")

    def ratio(mode: str) -> str:  # of the fastest steps, and the median of the rounds' own ratios
        per_round = [a / b for a, b in zip(rounds[("nblora", mode)], rounds[("lora", mode)], strict=True)]
        fastest = best[("nblora", mode)] / best[("lora", mode)]
        return f"{fastest:.3f} (median of rounds {statistics.median(per_round):.3f})"

    print(f"\ncompiled NB-LoRA / compiled PEFT LoRA step time: {ratio('compiled')}  (target <= 1.03)")
    print(
        "NB-LoRA / PEFT LoRA compile time:                "
        f"{compile_s['nblora'] / compile_s['lora']:.3f}  (target <= 1.2)"
    )
    print(f"eager NB-LoRA / eager PEFT LoRA step time:       {ratio('eager')}")
    n_pairs = args.pairs if args.pairs is not None else (100 if args.unet == "tiny" else 10)
    if n_pairs:
        pairs = sorted(paired_ratios(compiled, n_pairs, device))
        quartiles = ", ".join(f"{pairs[int(len(pairs) * q)]:.3f}" for q in (0.25, 0.75))
        print(
            f"compiled step, median of {len(pairs)} paired ratios:  {statistics.median(pairs):.3f} "
            f"(quartiles {quartiles})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
