"""The learning proof: GRPO learns the synthetic `render` task on CPU, with the listener off and on.

    python -m bench.learning                       # both runs of configs/learn_cpu.yaml (about 15 min on 2 cores)
    python -m bench.learning --runs listener_off --steps 20     # a quick look

Both runs start from the same checkpoint: the tiny reasoner warm-started on the answer format only
(`tiny://reasoner-sft`, built once under `--models` by `python -m pipeline sft`'s code; its answers are
coin flips), and the listener is that same frozen warm start. Each run is the real CLI,
`python -m pipeline train --config configs/learn_cpu.yaml ...`, in a subprocess, with the held-out greedy
accuracy (`eval/accuracy`, 64 pairs of a seed never trained on) logged every `trainer.eval_every` steps at
step = updates applied (0 = the warm start). The two runs differ only in `reward.w_listener` (0 and 0.5).

Writes bench/results/learning.json (per run `acc_start`, `acc_end`, `steps`, the curve, wall time, and the
training reward curve) and bench/results/learning.png (both held-out curves), and prints a table.
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "learning.json"
PLOT = ROOT / "bench" / "results" / "learning.png"
CONFIG = ROOT / "configs" / "learn_cpu.yaml"
RUNS = {"listener_off": ["reward.w_listener=0"], "listener_on": ["reward.w_listener=0.5"]}


def warm_start(models: Path) -> str:
    """The format warm start (`tiny://reasoner-sft`), built under `models` once and reused."""
    from pipeline.models import resolve_checkpoint

    return resolve_checkpoint("tiny://reasoner-sft", "model.reasoner", models)


def train(name: str, overrides: list[str], model: str, workdir: Path, steps: int | None, log: Path) -> dict[str, Any]:
    """One `python -m pipeline train` run from scratch; returns its curves from RUN_DIR/metrics.jsonl."""
    run_dir = workdir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(CONFIG), f"model.reasoner={model}",
               f"model.listener={model}", f"trainer.output_dir={run_dir}",
               f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", f"tracking.run_name=learning-{name}",
               *overrides, *([f"trainer.steps={steps}"] if steps else [])]
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_ADDRESS": ""})
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {result.returncode}); see {log}")
    return {**curves(run_dir / "metrics.jsonl"), "wall_s": round(time.perf_counter() - start, 1),
            "command": "python -m pipeline train --config configs/learn_cpu.yaml " + " ".join(overrides)}


def curves(metrics_file: Path) -> dict[str, Any]:
    """Held-out accuracy by updates applied, and the training reward by step."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    evals = sorted((r["step"], r["eval/accuracy"], r["eval/format_rate"]) for r in rows if "eval/accuracy" in r)
    train_rows = sorted((r["step"], r) for r in rows if "reward/mean" in r)
    return {
        "acc_start": evals[0][1], "acc_end": evals[-1][1], "steps": evals[-1][0],
        "reached_90_at": next((s for s, a, _ in evals if a >= 0.9), None),  # first update with >= 90% held out
        "curve": [{"step": s, "accuracy": a, "format_rate": f} for s, a, f in evals],
        "train": [{"step": s, "reward_accuracy": r["reward/accuracy"], "reward_format": r["reward/format"],
                   "reward_listener": r["reward/listener"], "contradiction_rate": r["listener/contradiction_rate"],
                   "step_s": r["time/step_s"]} for s, r in train_rows],
    }


def plot(report: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, run in report["runs"].items():
        ax.plot([p["step"] for p in run["curve"]], [p["accuracy"] for p in run["curve"]], marker="o",
                markersize=3, label=f"{name} ({run['acc_start']:.0%} -> best "
                f"{max(p['accuracy'] for p in run['curve']):.0%}, last {run['acc_end']:.0%})")
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8, label="target 90%")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8, label="chance")
    ax.set(xlabel="GRPO updates", ylabel="held-out greedy accuracy", ylim=(0.0, 1.02),
           title="Learning proof: tiny Qwen2.5-VL on CPU (configs/learn_cpu.yaml)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{'run':14} {'acc_start':>9} {'acc_end':>8} {'best':>6} {'steps':>6} {'wall min':>9}")
    for name, run in report["runs"].items():
        best = max(p["accuracy"] for p in run["curve"])
        print(f"{name:14} {run['acc_start']:>9.3f} {run['acc_end']:>8.3f} {best:>6.3f} {run['steps']:>6} "
              f"{run['wall_s'] / 60:>9.1f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=None, help="override trainer.steps (default: the config's)")
    parser.add_argument("--models", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-learning")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    from pipeline.config import load_config

    for key, value in dict(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0").items():
        os.environ.setdefault(key, value)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = warm_start(args.models)
    sft_s = time.perf_counter() - start
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report.setdefault("runs", {})
    for name in args.runs:
        report["runs"][name] = train(name, RUNS[name], model, args.workdir, args.steps, args.workdir / f"{name}.log")
    report.update({
        "config": "configs/learn_cpu.yaml", "synthetic_task": load_config(CONFIG).data.synthetic_task,
        "warm_start": model,
        "warm_start_manifest": json.loads((Path(model) / "sft_manifest.json").read_text()),
        "warm_start_build_s": round(sft_s, 1), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        **{key: {name: run[key] for name, run in report["runs"].items()} for key in ("acc_start", "acc_end", "steps")},
    })
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(f"wrote {args.out} and {args.plot}")
    return report


if __name__ == "__main__":
    main()
