"""Fine-tune a tiny random LLaMA with NB-LoRA through the transformers Trainer (CPU smoke run).

The model is built from a LlamaConfig, saved and reloaded with from_pretrained (no download). The
task is next-token prediction on counting sequences (t, t+1, t+2, ... mod V), which a random model
cannot do. NB-LoRA (preset "llama": q/k/v/o/gate/up/down, plus lm_head) trains with the Trainer,
optionally in bf16 autocast and with gradient checkpointing; adapter-only files land in every
checkpoint. At the end the adapter is saved, exported to the PEFT LoRA format and reloaded with
peft.PeftModel.from_pretrained, whose logits are compared with the NB-LoRA model's.

    python examples/llama_trainer_smoke.py --quick    # used by the tests
    python examples/llama_trainer_smoke.py --bf16 --gradient_checkpointing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from example_utils import require_positive, torch_threads, write_results

from nblora_diffusion.formats import MODEL_ADAPTER_CONFIG_FILE
from nblora_diffusion.transformer_models import (
    PRESETS,
    adapt_model,
    export_peft,
    load_model_adapter,
    make_tiny_llama,
    preset_config,
    save_model_adapter,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = PRESETS["llama"] + ("lm_head",)  # q/k/v/o/gate/up/down and the output head
FIRST_TOKEN = 3  # ids 0-2 are bos/eos/pad in the tiny config


class CountingDataset(torch.utils.data.Dataset):
    """Sequences t, t+1, ..., t+T-1 (mod the usable vocabulary), random start t."""

    def __init__(self, num: int, length: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        usable = vocab - FIRST_TOKEN
        start = torch.randint(0, usable, (num, 1), generator=g)
        self.ids = (start + torch.arange(length)) % usable + FIRST_TOKEN  # (num, T)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@torch.no_grad()
def next_token_accuracy(model, data: CountingDataset) -> float:
    model.eval()
    logits = model(input_ids=data.ids).logits  # (N, T, V)
    return float((logits[:, :-1].argmax(-1) == data.ids[:, 1:]).float().mean())


def run(args: argparse.Namespace, workdir: Path) -> dict:
    from peft import PeftModel
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments

    from nblora_diffusion.transformer_models.trainer import NBLoRACheckpointCallback

    base_dir = make_tiny_llama(workdir / "tiny-llama", seed=args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype)
    vocab = model.config.vocab_size
    train_data = CountingDataset(args.num_examples, args.seq_len, vocab, seed=args.seed)
    eval_data = CountingDataset(64, args.seq_len, vocab, seed=args.seed + 1)
    replaced = adapt_model(model, args.config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    acc_before = next_token_accuracy(model, eval_data)

    training_args = TrainingArguments(
        output_dir=str(workdir / "run"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_steps=max(1, args.max_steps // 2),
        save_total_limit=2,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        callbacks=[NBLoRACheckpointCallback(base_model=str(base_dir))],
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    acc_after = next_token_accuracy(model, eval_data)
    checkpoints = sorted(p.name for p in (workdir / "run").glob("checkpoint-*"))

    # native adapter -> fresh base model; PEFT export -> peft.PeftModel: both must give the same logits.
    # Compared in float32 on the same (possibly bf16-rounded) base weights, without the Trainer's autocast.
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).float()
    ids = eval_data.ids[:8]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    save_model_adapter(model, workdir / "adapter", base_model=str(base_dir))
    export_peft(model, workdir / "peft", base_model=str(base_dir))
    reloaded = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype).float()
    load_model_adapter(reloaded, workdir / "adapter")
    peft_base = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype).float()
    peft_model = PeftModel.from_pretrained(peft_base, workdir / "peft").eval()
    with torch.no_grad():
        native_diff = float((reloaded.eval()(input_ids=ids).logits - reference).abs().max())
        peft_diff = float((peft_model(input_ids=ids).logits - reference).abs().max())
    return {
        "replaced_modules": len(replaced),
        "trainable_params": trainable,
        "total_params": total,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "losses": losses,
        "next_token_acc_before": acc_before,
        "next_token_acc_after": acc_after,
        "checkpoints": checkpoints,
        "checkpoint_has_adapter": all(
            (workdir / "run" / c / MODEL_ADAPTER_CONFIG_FILE).is_file() for c in checkpoints
        ),
        "native_reload_max_abs_diff": native_diff,
        "peft_max_abs_diff": peft_diff,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON summary")
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--p", default="inf", help="Schatten exponent of the bound (1, 2, ..., inf)")
    parser.add_argument("--delta", type=float, default=2.0, help="absolute bound δ on ‖ΔW‖_Sp per layer")
    parser.add_argument("--num_examples", type=int, default=512)
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (adapters stay float32)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.max_steps is None:
        args.max_steps = 30 if args.quick else 300
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_positive(
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        rank=args.rank,
        num_examples=args.num_examples,
        threads=args.threads,
    )
    if args.seq_len < 2:
        print(f"error: --seq_len must be >= 2, got {args.seq_len}", file=sys.stderr)
        raise SystemExit(2)
    try:  # bad --p / --delta / --rank: the library's one-line error, before any work
        args.config = preset_config(rank=args.rank, p=args.p, delta=args.delta, preset=TARGETS)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        results = run(args, Path(tmp))
    print(json.dumps({k: v for k, v in results.items() if k != "losses"}, indent=1))
    name = "llama_trainer_smoke_quick" if args.quick else "llama_trainer_smoke"
    write_results(results, args.out, name)
    return results


if __name__ == "__main__":
    main()
