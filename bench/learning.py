"""The learning benchmark: GRPO on the synthetic `render` task on CPU, listener on vs off, over seeds.

    python -m bench.learning                                   # 2 conditions x 3 seeds of configs/learn_cpu.yaml
    python -m bench.learning --seeds 0 --runs listener_on --steps 10    # a quick look

Every run starts from the same checkpoints: the reasoner is the tiny reasoner warm-started on the answer
format (`tiny://reasoner-sft`: it describes both images and answers by a coin), the frozen listener is
`tiny://listener-sft` (it answers from the reasoning it reads, docs/listener.md); both are built once
under `--models`. Each run is the real CLI, `python -m pipeline train --config configs/learn_cpu.yaml
...`, in a subprocess; a condition's runs differ only in `trainer.seed`, the conditions only in
`reward.w_listener` (0 and 0.5). Logged every `trainer.eval_every` updates (step = updates applied, 0 =
the warm start): the greedy held-out accuracy on the training task (`eval/accuracy`, 64 pairs of a seed
never trained on) and on the out-of-distribution `render-ood` task (`eval_ood/accuracy`: prompt colours no
run or warm start saw). Every update: the listener's reward and the contradiction rate.

Writes bench/results/learning.json: per run (`runs`, keyed `CONDITION/seedS`) the curves; per condition
(`conditions`) the mean and spread (std, min, max over seeds) of each curve and of the end figures. Plots
bench/results/learning.png (mean and min-max band of the four curves). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "learning.json"
PLOT = ROOT / "bench" / "results" / "learning.png"
CONFIG = ROOT / "configs" / "learn_cpu.yaml"
RUNS = {"listener_off": ["reward.w_listener=0"], "listener_on": ["reward.w_listener=0.5"]}
TRAIN_CURVES = ("reward_listener", "contradiction_rate", "reward_accuracy")
WINDOW = 10  # updates averaged for a training curve's start and end figures


def _in_repo(path: str) -> str:
    """A path under the repository as repo-relative (result files are committed), any other as it is."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def warm_starts(models: Path) -> tuple[str, str]:
    """(reasoner, listener): `tiny://reasoner-sft` and `tiny://listener-sft`, built under `models` once."""
    from pipeline.models import resolve_checkpoints

    built = resolve_checkpoints({"model.reasoner": "tiny://reasoner-sft", "model.listener": "tiny://listener-sft"},
                                models)
    return built["model.reasoner"], built["model.listener"]


def train(name: str, seed: int, overrides: list[str], models: tuple[str, str], workdir: Path,
          steps: int | None) -> dict[str, Any]:
    """One `python -m pipeline train` run from scratch; returns its curves from RUN_DIR/metrics.jsonl."""
    run_dir = workdir / f"{name}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_overrides = [*overrides, f"trainer.seed={seed}", *([f"trainer.steps={steps}"] if steps else [])]
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(CONFIG), f"model.reasoner={models[0]}",
               f"model.listener={models[1]}", f"trainer.output_dir={run_dir}",
               f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", f"tracking.run_name=learning-{name}-{seed}",
               *run_overrides]
    print(f"{name} seed {seed}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    log = workdir / f"{name}-seed{seed}.log"
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_ADDRESS": ""})
    if result.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {result.returncode}); see {log}")
    return {**curves(run_dir / "metrics.jsonl"), "seed": seed, "wall_s": round(time.perf_counter() - start, 1),
            "command": "python -m pipeline train --config configs/learn_cpu.yaml " + " ".join(run_overrides)}


def curves(metrics_file: Path) -> dict[str, Any]:
    """Held-out (and OOD) accuracy by updates applied, and the training curves by step."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    evals = sorted((r["step"], r) for r in rows if "eval/accuracy" in r)
    train_rows = sorted((r["step"], r) for r in rows if "reward/mean" in r)
    return {
        "acc_start": evals[0][1]["eval/accuracy"], "acc_end": evals[-1][1]["eval/accuracy"], "steps": evals[-1][0],
        "ood_start": evals[0][1].get("eval_ood/accuracy"), "ood_end": evals[-1][1].get("eval_ood/accuracy"),
        "reached_90_at": next((s for s, r in evals if r["eval/accuracy"] >= 0.9), None),  # first update >= 90%
        "curve": [{"step": s, "accuracy": r["eval/accuracy"], "format_rate": r["eval/format_rate"],
                   "ood_accuracy": r.get("eval_ood/accuracy")} for s, r in evals],
        "train": [{"step": s, "reward_accuracy": r["reward/accuracy"], "reward_format": r["reward/format"],
                   "reward_listener": r["reward/listener"], "contradiction_rate": r["listener/contradiction_rate"],
                   "step_s": r["time/step_s"]} for s, r in train_rows],
    }


def spread(values: list[float]) -> dict[str, float]:
    """Mean, std (population), min and max of one figure over seeds; NaNs (undefined steps) left out."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def window_mean(points: list[dict[str, Any]], key: str, first: bool) -> float:
    """Mean of `key` over the first (or last) WINDOW training steps, NaNs left out."""
    values = [p[key] for p in (points[:WINDOW] if first else points[-WINDOW:])]
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def condition_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step mean/spread over seeds of every curve, and of the start and end figures."""
    eval_steps = sorted({p["step"] for run in runs for p in run["curve"]})
    train_steps = sorted({p["step"] for run in runs for p in run["train"]})
    by_eval = [{p["step"]: p for p in run["curve"]} for run in runs]
    by_train = [{p["step"]: p for p in run["train"]} for run in runs]
    return {
        "seeds": [run["seed"] for run in runs],
        "curve": [{"step": s, **{key: spread([r[s][key] for r in by_eval if s in r])
                                 for key in ("accuracy", "ood_accuracy")}} for s in eval_steps],
        "train": [{"step": s, **{key: spread([r[s][key] for r in by_train if s in r]) for key in TRAIN_CURVES}}
                  for s in train_steps],
        "end": {
            "accuracy": spread([run["acc_end"] for run in runs]),
            "ood_accuracy": spread([run["ood_end"] for run in runs]),
            **{f"{key}_first{WINDOW}": spread([window_mean(run["train"], key, True) for run in runs])
               for key in TRAIN_CURVES},
            **{f"{key}_last{WINDOW}": spread([window_mean(run["train"], key, False) for run in runs])
               for key in TRAIN_CURVES},
        },
    }


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve", "accuracy", "held-out accuracy (render)"),
              ("curve", "ood_accuracy", "OOD accuracy (render-ood)"),
              ("train", "reward_listener", "r_listener (training)"),
              ("train", "contradiction_rate", "contradiction rate (training)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (part, key, title) in zip(axes.flat, panels):
        for name, cond in report["conditions"].items():
            points = [(p["step"], p[key]) for p in cond[part] if p[key]["n"]]
            steps = [s for s, _ in points]
            line, = ax.plot(steps, [v["mean"] for _, v in points], label=f"{name} ({len(cond['seeds'])} seeds)",
                            marker="o" if part == "curve" else None, markersize=3)
            ax.fill_between(steps, [v["min"] for _, v in points], [v["max"] for _, v in points],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=title, ylim=(0.0, 1.02))
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
    for ax in axes[1]:
        ax.set_xlabel("GRPO updates")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("tiny Qwen2.5-VL on CPU (configs/learn_cpu.yaml): mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def print_table(report: dict[str, Any]) -> None:
    def fmt(s: dict[str, float]) -> str:
        return f"{s['mean']:.3f}+-{s['std']:.3f}"

    print(f"\n{'condition':13} {'held-out end':>14} {'OOD end':>14} {'r_list first':>14} {'r_list last':>14} "
          f"{'contra first':>14} {'contra last':>14}")
    for name, cond in report["conditions"].items():
        e = cond["end"]
        print(f"{name:13} {fmt(e['accuracy']):>14} {fmt(e['ood_accuracy']):>14} "
              f"{fmt(e[f'reward_listener_first{WINDOW}']):>14} {fmt(e[f'reward_listener_last{WINDOW}']):>14} "
              f"{fmt(e[f'contradiction_rate_first{WINDOW}']):>14} {fmt(e[f'contradiction_rate_last{WINDOW}']):>14}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="conditions to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="trainer.seed of each run")
    parser.add_argument("--steps", type=int, default=None, help="override trainer.steps (default: the config's)")
    parser.add_argument("--models", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-learning")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run, e.g. trainer.max_staleness=1")
    args = parser.parse_args(argv)
    from pipeline.config import load_config

    for key, value in dict(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0").items():
        os.environ.setdefault(key, value)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = warm_starts(args.models)
    build_s = time.perf_counter() - start
    runs: dict[str, dict[str, Any]] = {}
    for name in args.runs:
        for seed in args.seeds:
            runs[f"{name}/seed{seed}"] = train(name, seed, [*RUNS[name], *args.set], models, args.workdir,
                                              args.steps)
    cfg = load_config(CONFIG)
    report = {
        "config": "configs/learn_cpu.yaml", "synthetic_task": cfg.data.synthetic_task, "ood_task": cfg.data.ood_task,
        "seeds": args.seeds, "steps_override": args.steps, "overrides": args.set, "warm_starts": {role: _in_repo(m) for role, m in zip(("reasoner", "listener"), models)},
        "warm_start_manifests": {role: json.loads((Path(m) / "sft_manifest.json").read_text())
                                 for role, m in zip(("reasoner", "listener"), models)},
        "warm_start_build_s": round(build_s, 1), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "wall_s": round(time.perf_counter() - start, 1),
        "conditions": {name: condition_summary([runs[k] for k in runs if k.startswith(f"{name}/")])
                       for name in args.runs},
        "runs": runs,
    }
    print_table(report)
    write_result(report, args.out)
    plot(report, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return report


if __name__ == "__main__":
    main()
