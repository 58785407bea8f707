"""The command line: `python -m pipeline COMMAND ...` (also `listener-grpo COMMAND ...`); COMMAND is one of
train, evaluate, make-tiny, sft, warm-starts, scale-listeners.

Errors the user can fix (a bad config, a missing path) print one line to stderr and exit 2, with no
traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import get_args

from pipeline.config import ConfigError, SyntheticTask, config_to_yaml, load_config
from pipeline.errors import TrainingAborted
from pipeline.synthetic import TRAINING_TASKS


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
    p.add_argument("--dataset", required=True, help="Hub id, local path, or a preset of the paper's test sets: "
                   "imagereward-test, hpdv2-test, rapidata-style (docs/evaluation.md).")
    p.add_argument("--split", default="test", help="Dataset split.")
    p.add_argument("--listener", default=None, help="Listener checkpoint for the contradiction rate.")
    p.add_argument("--out", type=Path, default=Path("report.json"), help="JSON report path.")
    p.add_argument("--samples", type=int, default=1, help="Answers per pair: 1 is greedy, n > 1 a majority "
                   "vote of n samples (a tie counts as wrong).")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature when --samples > 1.")
    p.add_argument("--max-new-tokens", type=int, default=None, help="Generation budget per answer (default: "
                   "the checkpoint's run, else 256).")
    p.add_argument("--anchor", action="store_true", help="Rank each prompt's n images by n-1 comparisons with "
                   "its first image, scored by the reasoner's probability of each answer, instead of comparing "
                   "every pair.")
    p.add_argument("--both-orders", action="store_true", help="Judge each pair in both image orders; reports "
                   "accuracy per order, their mean and the position-bias rate.")
    p.add_argument("--max-groups", type=int, default=None, help="Evaluate only the first N prompts (pairs for "
                   "two-image datasets).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the image-order swap and of sampling.")
    p.add_argument("--format", default="auto", choices=["auto", "imagereward", "hpdv2", "pickapic", "rapidata",
                                                        "local"], help="Dataset schema (default: inferred).")
    p.add_argument("--subset", default="", help="Hub dataset config name (e.g. ImageRewardDB '8k').")
    p.add_argument("--ties", default="skip", choices=["skip", "random"], help="Human ties in pair datasets.")
    p.add_argument("--min-pixels", type=int, default=None, help="Images are resized to at least this many pixels "
                   "(default: the checkpoint's run, else 3136).")
    p.add_argument("--max-pixels", type=int, default=None, help="... and at most this many (default: the "
                   "checkpoint's run, else 12544).")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="Larger images are skipped.")
    p.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help="vLLM dtype (default: the checkpoint's run, else float32).")
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM context length (default: the "
                   "checkpoint's run, else 4096); a longer prompt is skipped, counted and judged wrong.")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per engine.")
    p.add_argument("--chunk-pairs", type=int, default=64, help="Comparisons decoded and judged at once: "
                   "memory is bounded by this, not by the dataset's size.")
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


def _add_sft(subparsers) -> None:
    p = subparsers.add_parser("sft", help="Warm-start a checkpoint on the answer format only (SFT).",
                              description="Supervised fine-tuning on synthetic pairs whose target answers are "
                              "right only --answer-accuracy of the time and whose descriptions are faithful only "
                              "--faithful-rate of the time: the result writes the format but answers at chance. "
                              "Runs through the DeepSpeed learner; writes a loadable checkpoint.")
    p.add_argument("--model", type=Path, required=True, help="Checkpoint to start from (e.g. from make-tiny).")
    p.add_argument("--out", type=Path, required=True, help="Output directory (replaced atomically).")
    p.add_argument("--steps", type=int, default=300, help="Optimizer steps.")
    p.add_argument("--pairs-per-step", type=int, default=16, help="Target sequences per step.")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the pairs, the answer coins and the learner.")
    p.add_argument("--answer-accuracy", type=float, default=0.5,
                   help="Probability that a target's answer is the preferred image (0.5: format only).")
    p.add_argument("--faithful-rate", type=float, default=0.5,
                   help="Probability that a target's reasoning describes each image as it is (else the two "
                        "descriptions are swapped; a coin independent of the answer's).")
    p.add_argument("--image-size", type=int, default=56, help="Side of the synthetic images (as data.image_size).")
    p.add_argument("--freeze-vision", action="store_true", help="Keep the vision tower frozen.")
    p.add_argument("--role", choices=("reasoner", "listener"), default="reasoner",
                   help="reasoner: the answer format; listener: answer from the reasoning read (docs/listener.md).")
    p.add_argument("--tasks", nargs="+", choices=get_args(SyntheticTask), default=list(TRAINING_TASKS),
                   help="Synthetic tasks the pairs come from, in turn (see pipeline/synthetic.py).")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of the learner rank.")
    p.set_defaults(handler=_sft)


def _sft(args: argparse.Namespace) -> int:
    from pipeline.sft import sft_command

    return sft_command(args)


def _add_warm_starts(subparsers) -> None:
    p = subparsers.add_parser("warm-starts", help="Build tiny://reasoner-sft and tiny://listener-sft side by side.",
                              description="Build the two tiny warm starts (the format warm start and the "
                              "informative listener, `pipeline.sft` default settings) at once, into "
                              "OUT/tiny-reasoner-sft and OUT/tiny-listener-sft, as a run does on first use; "
                              "one already built there with today's settings is kept. Holds OUT.lock meanwhile.")
    p.add_argument("--out", type=Path, required=True, help="Directory to build them in.")
    p.set_defaults(handler=_warm_starts)


def _warm_starts(args: argparse.Namespace) -> int:
    from filelock import FileLock

    from pipeline.models import resolve_checkpoints

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    specs = {"reasoner": "tiny://reasoner-sft", "listener": "tiny://listener-sft"}
    with FileLock(f"{out}.lock"):  # another build into OUT (or a test session reading it) waits for this one
        models = resolve_checkpoints(specs, out)
    for role, path in models.items():
        print(f"{role}: {path}")
    return 0


def _add_scale_listeners(subparsers) -> None:
    p = subparsers.add_parser("scale-listeners", help="Resize the listener pool of a running training job.",
                              description="Resize the live listener pool (a named Ray actor) of a running job; "
                              "on KubeRay the autoscaler then adds or removes listener pods. With "
                              "listener.autoscale.enabled the size asked for is kept for "
                              "listener.autoscale.override_hold_s, then autoscaling resumes; more than "
                              "listener.autoscale.max_workers is refused.")
    p.add_argument("--address", default="auto",
                   help="Ray cluster: GCS address HOST:6379, ray://HOST:10001, or 'auto' from a cluster node.")
    p.add_argument("--replicas", type=int, required=True, help="Listener workers wanted (>= 1).")
    p.add_argument("--timeout", type=float, default=900.0, help="Seconds to wait for new listener engines (on "
                   "KubeRay: for their pods); the ones not up by then are given up and the command says which "
                   "resources the cluster lacked (default 900).")
    p.set_defaults(handler=_scale_listeners)


def _scale_listeners(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {args.replicas}")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be positive, got {args.timeout:g}")
    import ray

    from pipeline.placement import LISTENER_POOL_NAME, RAY_NAMESPACE

    ray.init(address=args.address, namespace=RAY_NAMESPACE, log_to_driver=False)
    try:
        pool = ray.get_actor(LISTENER_POOL_NAME, namespace=RAY_NAMESPACE)
    except ValueError:
        raise ConfigError(f"no running training job with a listener pool on {args.address}") from None
    try:  # the pool gives up by --timeout; the margin covers the calls themselves
        result = ray.get(pool.scale_to.remote(args.replicas, args.timeout), timeout=args.timeout + 60)
    except ray.exceptions.GetTimeoutError:
        print(f"error: the listener pool did not answer within {args.timeout + 60:g} s", file=sys.stderr)
        return 1
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ValueError):  # refused: fewer than 1, or above autoscale.max_workers
            raise ConfigError(str(exc.cause)) from None
        raise
    print(f"listener pool: {result.before} -> {result.serving} workers"
          + (f" (autoscaling resumes in {result.hold_s:g} s)" if result.hold_s else ""))
    if result.error or result.serving != args.replicas:
        print(f"error: asked for {args.replicas} listener workers, {result.serving} serving: "
              f"{result.error or 'a new engine failed to start, or the job ended; see the job log'}", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    config_path = args.config
    if args.resume is not None and config_path is None:
        config_path = args.resume / "config.yaml"  # the run's own resolved config; overrides still apply
        if not config_path.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.yaml there (not a run directory)")
    cfg = load_config(config_path, args.overrides)
    if args.print_config:  # the config, then what the run will do with it (refusals: one line, exit 2)
        from pipeline.placement import check_plan, describe_plan

        check_plan(cfg)
        sys.stdout.write(config_to_yaml(cfg) + "".join(f"# plan: {line}\n" for line in describe_plan(cfg)))
        return 0
    from pipeline.driver import train  # heavy imports (ray) only when training

    return train(cfg, resume=args.resume)


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.eval.command import evaluate_command

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
    _add_sft(subparsers)
    _add_warm_starts(subparsers)
    _add_scale_listeners(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: '{args.command}' stopped", file=sys.stderr)
        return 130
    except TrainingAborted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("pipeline."):
            print(f"error: '{args.command}' is not available in this version ({exc.name} is missing)",
                  file=sys.stderr)
            return 2
        raise
