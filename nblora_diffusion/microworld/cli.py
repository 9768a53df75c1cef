"""Command line of the micro world: ``pretrain`` (the micro SD) and ``subjects`` (the DreamBooth set)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from .pretrain import PretrainConfig, pretrain

    parser = argparse.ArgumentParser(prog="python -m nblora_diffusion.microworld")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain the micro SD (resumable: run the same command again)")
    p.add_argument("--out", required=True, help="work folder (state file, and the model in OUT/model)")
    for f in dataclasses.fields(PretrainConfig):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    j = sub.add_parser("judge", help="train the judge CNN (kind and pattern reader) and report its accuracy")
    j.add_argument("--out", required=True, help="safetensors file to write")
    j.add_argument("--steps", type=int, default=3000)
    j.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("gates", help="measure the micro SD's quality gates with the judges")
    q.add_argument("--model", default=None, help="pipeline folder (default: the shipped micro SD)")
    q.add_argument("--seeds", type=int, default=2)
    s = sub.add_parser("subjects", help="write the micro subjects in the DreamBooth dataset layout")
    s.add_argument("--out", required=True, help="dataset folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "pretrain":
            cfg = PretrainConfig(
                **{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
            )
            print(pretrain(cfg, args.out))
        elif args.command == "judge":
            import json

            from .judges import judge_accuracy, save_judge, train_judge

            net = train_judge(steps=args.steps, seed=args.seed)
            save_judge(net, args.out)
            acc = {"clean": judge_accuracy(net), "blurred_noisy": judge_accuracy(net, augment=True)}
            print(json.dumps(acc, indent=2))
        elif args.command == "gates":
            import json

            from .gates import measure

            print(json.dumps(measure(args.model, args.seeds), indent=2))
        elif args.command == "subjects":
            from .subjects import write_dataset

            print(write_dataset(args.out))
    except (ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0
