"""End to end: whole GRPO runs through `python -m pipeline train`, against the single-process TRL reference.

    python -m bench.e2e                                   # mid and tiny, trainer.max_staleness 0 and 1
    python -m bench.e2e --workloads tiny --staleness 1    # one of them

Each run is `python -m pipeline train --config configs/tiny_cpu.yaml <workload> trainer.max_staleness=S` in
a subprocess of its own (the driver's `train()`, its local Ray cluster, every actor), on checkpoints built
once with `python -m pipeline make-tiny` under runs/bench-models. The workloads are those of issue 14:

- mid: 16 pairs x G=8 x <= 128 new tokens, images 64 px, the `mid` checkpoint as reasoner and listener,
  lr 1e-5, every group kept (so every step trains and syncs, as TRL does), engines at `engine.dtype: auto`;
- tiny: 8 pairs x G=4 x <= 64 new tokens, the `tiny` checkpoints, engines fp32, otherwise the same.

Four steps; the first (start-up, first calls) is not counted. Per step, from the run's own metrics
(RUN/metrics.jsonl): seconds (wall time between two steps' metric rows), completions/s and generated
tokens/s (completions and tokens of the step / those seconds), the per-stage seconds (`time/*`, `sync/*`
as the run logged them). While the run goes, its whole process tree (driver, Ray's GCS and raylet, every
actor and Ray worker) is sampled every 0.25 s: CPU utilisation of a step = the busy core-seconds (user +
system) all those processes spent in it / (cores x its seconds); and the peak RSS per actor kind (Ray
titles an actor's process `ray::Class`).

The reference (issue 14, not measured here; TRL is not a dependency): TRL 1.16 `GRPOTrainer`, HF
`generate` in fp32, gradient checkpointing, 2 threads, no listener, on the same checkpoints and work, on
one 2-core CPU machine of the kind the pipeline is benchmarked on (AVX-512 without bf16 units), Nov 29.

Writes bench/results/e2e.json (runs measured by this call replace those of the same name) and prints a
table; `python -m bench.report` renders it into BENCHMARKS.md with bench/results/e2e.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "e2e.json"
MODELS = ROOT / "runs" / "bench-models"
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
COMMON = ["data.image_size=64", "trainer.steps=4", "trainer.checkpoint_every=1000", "learner.lr=1e-5",
          "reward.drop_zero_variance=false"]
WORKLOADS: dict[str, dict[str, Any]] = {
    "mid": {"size": "mid", "overrides": ["data.pairs_per_step=16", "rollout.group_size=8",
                                         "rollout.max_new_tokens=128", *COMMON]},
    "tiny": {"size": "tiny", "overrides": ["data.pairs_per_step=8", "rollout.group_size=4",
                                           "rollout.max_new_tokens=64", "rollout.engine.dtype=float32",
                                           "listener.engine.dtype=float32", *COMMON]},
}
# Issue 14's reference, measured side by side with the pipeline of then (s/step: median and range).
REFERENCE = {
    "source": "issue 14: TRL 1.16 GRPOTrainer, HF generate fp32, gradient checkpointing, 2 threads, no listener; "
              "one 2-core CPU machine (AVX-512, no bf16 units), Nov 29; same checkpoints and work",
    "mid": {"trl_s_per_step": 104.0, "trl_range": [96.0, 112.0], "trl_completions_per_s": 1.23,
            "pipeline_then_s_per_step": 137.0},
    "tiny": {"trl_s_per_step": 0.70, "trl_range": [0.67, 0.83], "trl_completions_per_s": 45.8,
             "pipeline_then_s_per_step": 2.97},
}
WARMUP_STEPS = 1
SAMPLE_S = 0.25


def checkpoints(size: str, models: Path) -> tuple[Path, Path]:
    """Reasoner and listener checkpoints of `size` (mid: one checkpoint for both, as in the issue)."""
    roles = ("reasoner",) if size == "mid" else ("reasoner", "listener")
    paths = []
    for role in roles:
        out = models / f"e2e-{size}-{role}"
        if not (out / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "pipeline", "make-tiny", "--size", size, "--role", role,
                            "--out", str(out)], cwd=ROOT, check=True)
        paths.append(out)
    return paths[0], paths[-1]


def train_command(workload: str, staleness: int, run_dir: Path, models: Path, extra: list[str] = ()) -> list[str]:
    reasoner, listener = checkpoints(WORKLOADS[workload]["size"], models)
    return [sys.executable, "-m", "pipeline", "train", "--config", str(CONFIG), f"model.reasoner={reasoner}",
            f"model.listener={listener}", *WORKLOADS[workload]["overrides"], f"trainer.max_staleness={staleness}",
            *extra, f"trainer.output_dir={run_dir}", f"tracking.tracking_uri=sqlite:///{run_dir}/mlflow.db"]


# ---- sampling the run's process tree -----------------------------------------------------------------

class TreeSampler:
    """Busy CPU seconds and RSS per actor kind of a process and all its descendants, sampled over time."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.cpu_by_pid: dict[int, float] = {}  # last seen user + system seconds of every process ever seen
        self.samples: list[tuple[float, float]] = []  # (time.time(), busy core-seconds so far)
        self.peak_rss_by_kind: dict[str, int] = {}

    def sample(self) -> None:
        import psutil

        from bench.step import actor_kind

        rss_by_kind: dict[str, int] = {}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    times, rss = proc.cpu_times(), proc.memory_info().rss
                    kind = actor_kind(proc.cmdline(), proc.pid == self.root.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.cpu_by_pid[proc.pid] = times.user + times.system
            rss_by_kind[kind] = rss_by_kind.get(kind, 0) + rss
        self.samples.append((time.time(), sum(self.cpu_by_pid.values())))
        for kind, rss in rss_by_kind.items():
            self.peak_rss_by_kind[kind] = max(self.peak_rss_by_kind.get(kind, 0), rss)

    def busy_between(self, start: float, end: float) -> float:
        """Core-seconds spent between two wall-clock times (linear between samples)."""
        return _interpolate(self.samples, end) - _interpolate(self.samples, start)


def _interpolate(samples: list[tuple[float, float]], at: float) -> float:
    if not samples:
        return 0.0
    if at <= samples[0][0]:
        return samples[0][1]
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t0 <= at <= t1:
            return v0 + (v1 - v0) * (at - t0) / max(t1 - t0, 1e-9)
    return samples[-1][1]


# ---- one run -----------------------------------------------------------------------------------------

def run_once(workload: str, staleness: int, workdir: Path, models: Path, extra: list[str] = ()) -> dict[str, Any]:
    run_dir = workdir / f"{workload}-s{staleness}"
    command = train_command(workload, staleness, run_dir, models, extra)
    env = {**os.environ, "RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.time()
    log_path = workdir / f"{workload}-s{staleness}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeSampler(process.pid)
        while process.poll() is None:
            sampler.sample()
            time.sleep(SAMPLE_S)
    if process.returncode != 0:
        raise RuntimeError(f"{workload} staleness {staleness} failed (exit {process.returncode}): "
                           f"{log_path.read_text()[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = step_rows([row for row in rows if "learn/skipped" in row], start, sampler)
    return summarise(workload, staleness, command, steps, sampler, time.time() - start)


def step_rows(rows: list[dict[str, Any]], start: float, sampler: TreeSampler) -> list[dict[str, Any]]:
    cores = os.cpu_count() or 1
    out, previous = [], start
    for row in rows:
        end = row["timestamp_ms"] / 1000
        wall = end - previous
        completions = row["throughput/samples_per_s"] * row["time/step_s"]
        tokens = row["throughput/rollout_tokens_per_s"] * row["time/rollout_s"]
        out.append({"step": row["step"], "seconds": wall, "completions": round(completions),
                    "tokens": round(tokens), "completions_per_s": completions / wall, "tokens_per_s": tokens / wall,
                    "cpu_utilisation": sampler.busy_between(previous, end) / (cores * wall),
                    "stages_s": {k: v for k, v in row.items() if k.startswith(("time/", "sync/"))},
                    "staleness": row.get("policy/staleness", 0.0), "learn_skipped": row["learn/skipped"]})
        previous = end
    return out


def summarise(workload: str, staleness: int, command: list[str], steps: list[dict[str, Any]],
              sampler: TreeSampler, wall_s: float) -> dict[str, Any]:
    counted = steps[WARMUP_STEPS:]
    seconds = sum(s["seconds"] for s in counted)
    stage_keys = sorted({k for s in counted for k in s["stages_s"]})
    from actors.engine import host_dtype_support, resolve_dtype

    return {
        "workload": workload, "max_staleness": staleness,
        "command": " ".join(["python", *command[1:]]).replace(str(ROOT) + "/", ""),
        "engine_dtype": resolve_dtype("float32" if workload == "tiny" else "auto", *host_dtype_support()),
        "steps_counted": [s["step"] for s in counted],
        "s_per_step_median": statistics.median(s["seconds"] for s in counted),
        "s_per_step_range": [min(s["seconds"] for s in counted), max(s["seconds"] for s in counted)],
        "completions_per_s": sum(s["completions"] for s in counted) / seconds,
        "tokens_per_s": sum(s["tokens"] for s in counted) / seconds,
        "cpu_utilisation": statistics.mean(s["cpu_utilisation"] for s in counted),
        "stages_s_mean": {k: statistics.mean(s["stages_s"].get(k, 0.0) for s in counted) for k in stage_keys},
        "peak_rss_mib_by_kind": {k: round(v / 2**20) for k, v in sorted(sampler.peak_rss_by_kind.items())},
        "cores": os.cpu_count(), "wall_s_whole_run": wall_s, "steps": steps,
    }


# ---- the table and the plot (also rendered by bench.report) ------------------------------------------

def e2e_table(result: dict[str, Any]) -> list[str]:
    ref = result.get("reference", REFERENCE)
    out = ["", "End to end (bench/results/e2e.json, `python -m bench.e2e`): whole runs of `python -m pipeline "
           f"train`, steps 2-4; reference: {ref['source']}", "",
           "| workload | run | s/step (median, range) | completions/s | tokens/s | vs TRL (completions/s) | "
           "CPU util | rollout s | listener s | learn s | sync s | rollout wait s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for workload in WORKLOADS:
        r = ref[workload]
        out.append(f"| {workload} | TRL (reference, issue 14) | {r['trl_s_per_step']:g} ({r['trl_range'][0]:g}-"
                   f"{r['trl_range'][1]:g}) | {r['trl_completions_per_s']:g} | | 1.00x | | | | | | |")
        for name, run in sorted(result.get("runs", {}).items()):
            if run["workload"] != workload:
                continue
            st = run["stages_s_mean"]
            cells = [f"{st.get(f'time/{k}_s', float('nan')):.2f}" for k in ("rollout", "listener", "learn", "sync",
                                                                                "rollout_wait")]
            low, high = run["s_per_step_range"]
            out.append(f"| {workload} | pipeline, max_staleness {run['max_staleness']} ({run['engine_dtype']}) | "
                       f"{run['s_per_step_median']:.2f} ({low:.2f}-{high:.2f}) | {run['completions_per_s']:.2f} | "
                       f"{run['tokens_per_s']:.0f} | {run['completions_per_s'] / r['trl_completions_per_s']:.2f}x | "
                       f"{100 * run['cpu_utilisation']:.0f}% | {' | '.join(cells)} |")
    kinds = sorted({k for run in result.get("runs", {}).values() for k in run["peak_rss_mib_by_kind"]})
    if kinds:
        out += ["", "Peak RSS per actor kind, MiB (whole run)", "",
                "| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        out += [f"| {name} | " + " | ".join(str(run["peak_rss_mib_by_kind"].get(k, "")) for k in kinds) + " |"
                for name, run in sorted(result["runs"].items())]
    return out


def e2e_plot(result: dict[str, Any], path: Path) -> Path | None:
    """s/step per workload: the TRL reference beside each measured run."""
    runs = result.get("runs", {})
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = result.get("reference", REFERENCE)
    workloads = [w for w in WORKLOADS if any(r["workload"] == w for r in runs.values())]
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.2), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        labels, values = ["TRL\n(reference)"], [ref[workload]["trl_s_per_step"]]
        for name, run in sorted(runs.items()):
            if run["workload"] == workload:
                labels.append(f"staleness {run['max_staleness']}")
                values.append(run["s_per_step_median"])
        ax.bar(range(len(values)), values, color=["grey"] + ["tab:blue"] * (len(values) - 1))
        ax.set(xticks=range(len(values)), ylabel="seconds per step (median)", title=f"{workload}: end to end")
        ax.set_xticklabels(labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--staleness", nargs="+", type=int, choices=[0, 1], default=[0, 1])
    parser.add_argument("--models", type=Path, default=MODELS, help="where make-tiny checkpoints are built/reused")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run (recorded in each run's command)")
    args = parser.parse_args(argv)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
                   "date": time.strftime("%Y-%m-%d"), "reference": REFERENCE})
    runs = result.setdefault("runs", {})
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for workload in args.workloads:
            for staleness in args.staleness:
                print(f"== {workload}, trainer.max_staleness={staleness}", flush=True)
                run = run_once(workload, staleness, Path(tmp), args.models, args.set)
                runs[f"{workload}-s{staleness}"] = run
                print(f"   {run['s_per_step_median']:.2f} s/step, {run['completions_per_s']:.2f} completions/s, "
                      f"CPU {100 * run['cpu_utilisation']:.0f}%", flush=True)
    write_result(result, args.out)
    print("\n".join(e2e_table(result)))
    e2e_plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
