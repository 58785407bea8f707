"""The command line: `python -m pipeline {train,evaluate,make-tiny} ...` (also `listener-grpo ...`).

Errors the user can fix (a bad config, a missing path) print one line to stderr and exit 2, with no
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, config_to_yaml, load_config


def _add_train(subparsers) -> None:
    p = subparsers.add_parser("train", help="Train the reasoner with listener-augmented GRPO.",
                              description="Train with GRPO. With no arguments, runs configs/tiny_cpu.yaml.")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: configs/tiny_cpu.yaml).")
    p.add_argument("--resume", type=Path, default=None, help="Run directory to resume from.")
    p.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Dotted overrides, e.g. learner.lr=1e-6.")
    p.set_defaults(handler=_train)


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Pairwise accuracy of a reasoner on a preference dataset.")
    p.add_argument("--model", required=True, help="Reasoner checkpoint: local dir or hub id.")
    p.add_argument("--dataset", required=True, help="Dataset name or local path.")
    p.add_argument("--split", default="test", help="Dataset split.")
    p.add_argument("--listener", default=None, help="Listener checkpoint for the contradiction rate.")
    p.add_argument("--out", type=Path, default=Path("report.json"), help="JSON report path.")
    p.set_defaults(handler=_evaluate)


def _add_make_tiny(subparsers) -> None:
    p = subparsers.add_parser("make-tiny", help="Build a tiny random Qwen2.5-VL checkpoint offline.")
    p.add_argument("--out", type=Path, required=True, help="Output directory (replaced atomically).")
    p.add_argument("--role", choices=["reasoner", "listener"], default="reasoner",
                   help="Role; picks the default seed (reasoner 0, listener 1).")
    p.add_argument("--size", choices=["tiny", "mid"], default="tiny",
                   help="tiny: ~1M parameters (tests); mid: hidden 512, 8 layers (benchmarks).")
    p.add_argument("--seed", type=int, default=None, help="Weight seed (default: from the role).")
    p.set_defaults(handler=_make_tiny)


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(config_to_yaml(cfg))
        return 0
    from pipeline.driver import train  # heavy imports (ray) only when training

    return train(cfg, resume=args.resume)


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_command

    return evaluate_command(args)


def _make_tiny(args: argparse.Namespace) -> int:
    from pipeline.tiny import make_tiny

    out = make_tiny(args.out, role=args.role, size=args.size, seed=args.seed)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline",
                                     description="Listener-augmented GRPO for VLM reward models, on Ray.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(subparsers)
    _add_evaluate(subparsers)
    _add_make_tiny(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("pipeline."):
            print(f"error: '{args.command}' is not available in this version ({exc.name} is missing)",
                  file=sys.stderr)
            return 2
        raise
