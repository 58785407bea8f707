"""End to end, side by side: `python -m pipeline train` against TRL's single-process `GRPOTrainer`, in one run.

    make bench-setup                                     # once: TRL into .venv (the `bench` extra, pinned)
    python -m bench.e2e                                  # mid and tiny: the pipeline, then TRL's configurations
    python -m bench.e2e --workloads tiny                 # one workload (about 4 min on 2 cores; mid about 25)
    python -m bench.e2e --workloads tiny --repeats 3     # three rounds in rotation, pooled
    python -m bench.e2e --workloads mid --trl-configs no_gc bf16 --staleness 1
    python -m bench.e2e --scaling                        # the scaling sweep at mid (pipeline only), its own JSON

For each workload the pipeline runs first (`python -m pipeline train --config configs/tiny_cpu.yaml
<workload> trainer.max_staleness=1`, the defaults otherwise), then TRL's `GRPOTrainer` in each configuration
of `bench.trl_reference` (its defaults in fp32, without gradient checkpointing, and bf16 autocast where the CPU
has bf16 units), every run a fresh subprocess, one after the other, on the same `make-tiny` checkpoints
(built once under runs/bench-models), pairs, G, token budget, lr and reward (TRL's without the listener). The
ratio is TRL's FASTEST configuration's s/step over the pipeline's (median steps; the same work per step), so
> 1 means the pipeline is faster. Both sides run on the same allocator: a CPU run's driver preloads tcmalloc
into its actors where installed (pipeline/placement.py), and TRL runs under it too (`allocator` in the JSON).
Workloads (issue 14):

- mid: 16 pairs x G=8 x <= 128 new tokens, images 64 px, the `mid` checkpoint as reasoner and listener,
  lr 1e-5, every group kept (so every step trains and syncs, as TRL does), engines at `engine.dtype: auto`;
- tiny: 8 pairs x G=4 x <= 64 new tokens, the `tiny` checkpoints, engines fp32, otherwise the same.

Steps per run: 6 at mid, 12 at tiny. Counted: the steady steps. The first (start-up, first calls) never
counts, nor, with `max_staleness` 1, the pipeline's last: it has no next rollout beside it, so the learner
runs alone and the step is shorter than any steady one (mid: 17.7 s against 27 s). Per step: seconds
(pipeline: wall time between two steps' metric rows in RUN/metrics.jsonl; TRL: between two `on_step_end`
callbacks), completions/s and generated tokens/s, the pipeline's per-stage seconds (`time/*`, `sync/*`), and
CPU utilisation: every process of the run's tree is sampled every 0.25 s; busy core-seconds (user + system)
in the step / (cores x its seconds). Peak RSS per actor kind (Ray titles an actor's process `ray::Class`).

`--repeats N` runs every configuration N times in rotation (pipeline, its variants, TRL's, then again) and
pools each configuration's counted steps: this machine's speed drifts by 10-30% over minutes (other jobs on
the host), which a tiny run of half-second steps cannot average out alone; each round's median is kept.

`--variants compiled` adds a pipeline run per staleness with that variant's overrides (PIPELINE_VARIANTS:
compiled engines), its ratio beside the default's; every run also records its first step's seconds from
the process start (start-up included), the cost a variant may move out of the steady steps.

`--scaling` sweeps the pipeline alone at one workload (mid by default): pairs per step (8, 16, 32; staleness
1, one listener) and listener workers (1, 2) with `trainer.max_staleness` 0 and 1 (16 pairs): s/step and CPU
use, into bench/results/e2e_scaling.json (plot: `python -m bench.report`, e2e_scaling.png).

Each workload's entry of bench/results/e2e.json comes from one invocation and holds both sides, the date,
the git commit and the machine (CPU model, flags, cores); a later invocation replaces the entries of the
workloads it measured and keeps the others. Prints the table; `python -m bench.report` renders it into
BENCHMARKS.md with bench/results/e2e.png.
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
from bench.e2e_render import e2e_plot, e2e_table, scaling_table
from bench.trl_reference import CONFIGS as TRL_CONFIGS
from bench.trl_reference import DEFAULT_CONFIGS as TRL_DEFAULT_CONFIGS
from bench.trl_reference import needs_bf16_units

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "e2e.json"
SCALING_RESULTS = ROOT / "bench" / "results" / "e2e_scaling.json"
MODELS = ROOT / "runs" / "bench-models"
CONFIG = ROOT / "configs" / "tiny_cpu.yaml"
COMMON = ["data.image_size=64", "trainer.checkpoint_every=1000", "learner.lr=1e-5", "reward.drop_zero_variance=false"]
# Steps per run, both sides: at least 4 steady steps counted at mid; tiny steps are half a second, so more of
# them steady its median.
WORKLOADS: dict[str, dict[str, Any]] = {
    "mid": {"size": "mid", "pairs": 16, "group_size": 8, "max_new_tokens": 128, "steps": 6,
            "overrides": ["data.pairs_per_step=16", "rollout.group_size=8", "rollout.max_new_tokens=128",
                          "trainer.steps=6", *COMMON]},
    "tiny": {"size": "tiny", "pairs": 8, "group_size": 4, "max_new_tokens": 64, "steps": 12,
             "overrides": ["data.pairs_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=64",
                           "rollout.engine.dtype=float32", "listener.engine.dtype=float32", "trainer.steps=12",
                           *COMMON]},
}
# Pipeline variants measured beside the defaults with `--variants`: switches a user may flip, each with a
# cost the steady s/step does not show (so never what the targets are read from).
PIPELINE_VARIANTS: dict[str, list[str]] = {
    # torch.compile'd vLLM engines (vLLM's own default; the CPU configs run eager to start fast)
    "compiled": ["rollout.engine.enforce_eager=false", "listener.engine.enforce_eager=false"],
}
SCALING_PAIRS = (8, 16, 32)
SCALING_LISTENERS = (1, 2)
WARMUP_STEPS = 1
SAMPLE_S = 0.25
ENV = {"RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


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


def trl_command(workload: str, config: str, out: Path, models: Path) -> list[str]:
    w = WORKLOADS[workload]
    reasoner, _ = checkpoints(w["size"], models)
    return [sys.executable, "-m", "bench.trl_reference", "--model", str(reasoner), "--config", config,
            "--pairs", str(w["pairs"]), "--group-size", str(w["group_size"]), "--max-new-tokens",
            str(w["max_new_tokens"]), "--image-size", "64", "--steps", str(w["steps"]), "--lr", "1e-5",
            "--out", str(out)]


# ---- the machine ---------------------------------------------------------------------------------------

def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, from /proc/cpuinfo (empty where there is none)."""
    from actors.engine import host_dtype_support

    return host_dtype_support()[0]


def machine() -> dict[str, Any]:
    """What a figure was measured on and with: CPU, flags, cores, memory, date, the repository's commit."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":(exclude)bench/results"],  # the benchmark's own output, written per workload
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    from actors.engine import BF16_CPU_FLAGS

    flags = cpu_flags()
    return {"cpu_model": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "bf16_units": bool(BF16_CPU_FLAGS & flags),
            "cpu_flags": sorted(flags), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "git_commit": commit, "git_tree_dirty": bool(dirty), "load_average_at_start": os.getloadavg()}


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


# ---- sampling a run's process tree -----------------------------------------------------------------------

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


def sampled_run(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> tuple[TreeSampler, float]:
    """Run `command` to its end while sampling its process tree; (sampler, start time). Raises on failure."""
    start = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **ENV, **(env or {})})
        sampler = TreeSampler(process.pid)
        while process.poll() is None:
            sampler.sample()
            time.sleep(SAMPLE_S)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:4])} ... failed (exit {process.returncode}): "
                           f"{log_path.read_text()[-3000:]}")
    return sampler, start


# ---- one run of each side --------------------------------------------------------------------------------

def run_pipeline(workload: str, staleness: int, workdir: Path, models: Path, extra: list[str] = (),
                 name: str | None = None) -> dict[str, Any]:
    name = name or f"{workload}-s{staleness}"
    run_dir = workdir / name
    command = train_command(workload, staleness, run_dir, models, extra)
    sampler, start = sampled_run(command, workdir / f"{name}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = step_rows([row for row in rows if "learn/skipped" in row], start, sampler)
    from actors.engine import resolve_dtype

    # With staleness 1 the last step has no next rollout beside it (the learner runs alone): not a steady step.
    run = summarise(workload, command, steps, sampler, time.time() - start, drain_steps=1 if staleness else 0)
    precision = resolve_dtype("float32" if workload == "tiny" else "auto", cpu_flags())
    malloc = allocator_name(allocator_env())  # what the driver preloads into the actors
    return {**run, "side": "pipeline", "max_staleness": staleness, "engine_dtype": precision, "allocator": malloc,
            "configuration": f"max_staleness {staleness}, engines {precision}, {malloc}"
                             + (f", {' '.join(extra)}" if extra else "")}


def run_trl(workload: str, config: str, workdir: Path, models: Path) -> dict[str, Any]:
    out = workdir / f"{workload}-trl-{config}.json"
    command = trl_command(workload, config, out, models)
    allocator = allocator_env()
    sampler, start = sampled_run(command, workdir / f"{workload}-trl-{config}.log", allocator)
    trl = json.loads(out.read_text())
    run = summarise(workload, command, trl_step_rows(trl, sampler), sampler, time.time() - start)
    if trl["steps"]:  # its step rows run from train(); the first step's figure, like the pipeline's, from the process start
        run["first_step_s"] = trl["steps"][0]["end"] - start
    precision = "bf16 autocast" if trl["settings"]["bf16"] else "fp32"
    checkpointing = "gradient checkpointing" if trl["settings"]["gradient_checkpointing"] else "no gradient checkpointing"
    malloc = allocator_name(allocator)
    return {**run, "side": "trl", "trl_config": config, "versions": trl["versions"], "threads": trl["threads"],
            "allocator": malloc,
            "configuration": f"TRL {config}: {precision}, {checkpointing}, {trl['threads']} threads, {malloc}"}


def allocator_env() -> dict[str, str]:
    """The allocator preload the pipeline's actors get on this machine (a CPU run preloads tcmalloc where
    installed, pipeline/placement.py); TRL runs under it too, so the allocator is not what the ratio measures."""
    from pipeline.placement import local_cluster_env, tcmalloc_path

    preload = local_cluster_env(os.environ, tcmalloc=tcmalloc_path()).get("LD_PRELOAD", os.environ.get("LD_PRELOAD"))
    return {"LD_PRELOAD": preload} if preload else {}


def allocator_name(env: dict[str, str]) -> str:
    """How a run's JSON and table name the allocator of `env` (an `allocator_env()`)."""
    preload = env.get("LD_PRELOAD", "")
    return "tcmalloc" if "tcmalloc" in preload else f"LD_PRELOAD={preload}" if preload else "glibc malloc"


def trl_step_rows(trl: dict[str, Any], sampler: TreeSampler) -> list[dict[str, Any]]:
    """TRL's per-step figures from bench.trl_reference's step-end times and the CPU samples."""
    cores = os.cpu_count() or 1
    out, previous = [], trl["train_start"]
    for row in trl["steps"]:
        wall, tokens = row["end"] - previous, row.get("tokens", 0)
        out.append({"step": row["step"], "seconds": wall, "completions": row["completions"], "tokens": tokens,
                    "completions_per_s": row["completions"] / wall, "tokens_per_s": tokens / wall,
                    "cpu_utilisation": sampler.busy_between(previous, row["end"]) / (cores * wall), "stages_s": {}})
        previous = row["end"]
    return out


def step_rows(rows: list[dict[str, Any]], start: float, sampler: TreeSampler) -> list[dict[str, Any]]:
    """The pipeline's per-step figures from its metric rows (one per step) and the CPU samples."""
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


def summarise(workload: str, command: list[str], steps: list[dict[str, Any]], sampler: TreeSampler,
              wall_s: float, drain_steps: int = 0) -> dict[str, Any]:
    """A run's steady steps: without the warm-up step and the last `drain_steps`."""
    counted = steps[WARMUP_STEPS:len(steps) - drain_steps]
    return {
        "workload": workload, "command": " ".join(["python", *command[1:]]).replace(str(ROOT) + "/", ""),
        "steps_counted": [s["step"] for s in counted], **step_figures(counted),
        "peak_rss_mib_by_kind": {k: round(v / 2**20) for k, v in sorted(sampler.peak_rss_by_kind.items())},
        "first_step_s": steps[0]["seconds"] if steps else float("nan"),  # from the process start: start-up too
        "cores": os.cpu_count(), "wall_s_whole_run": wall_s, "steps": steps,
    }


def step_figures(counted: list[dict[str, Any]]) -> dict[str, Any]:
    """s/step (median, range), rates, CPU use and mean stage seconds over the counted steps."""
    seconds = sum(s["seconds"] for s in counted)
    stage_keys = sorted({k for s in counted for k in s["stages_s"]})
    return {
        "s_per_step_median": statistics.median(s["seconds"] for s in counted),
        "s_per_step_range": [min(s["seconds"] for s in counted), max(s["seconds"] for s in counted)],
        "completions_per_s": sum(s["completions"] for s in counted) / seconds,
        "tokens_per_s": sum(s["tokens"] for s in counted) / seconds,
        "cpu_utilisation": statistics.mean(s["cpu_utilisation"] for s in counted),
        "stages_s_mean": {k: statistics.mean(s["stages_s"].get(k, 0.0) for s in counted) for k in stage_keys},
    }


def pooled(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeats of one configuration (run in rotation with the others) as one entry: its figures over every
    repeat's counted steps, so a drift of the machine during the invocation reaches every side alike; each
    repeat's own median and first step are kept."""
    if len(repeats) == 1:
        return repeats[0]
    counted = [s for run in repeats for s in run["steps"] if s["step"] in run["steps_counted"]]
    peak: dict[str, int] = {}
    for run in repeats:
        for kind, mib in run["peak_rss_mib_by_kind"].items():
            peak[kind] = max(peak.get(kind, 0), mib)
    return {**repeats[0], **step_figures(counted), "peak_rss_mib_by_kind": peak,
            "first_step_s": statistics.median(run["first_step_s"] for run in repeats),
            "repeats": [{key: run[key] for key in ("s_per_step_median", "first_step_s", "steps_counted", "steps",
                                                   "wall_s_whole_run")} for run in repeats],
            "steps_counted": [s["step"] for s in counted], "steps": [],  # per repeat, under "repeats"
            "wall_s_whole_run": sum(run["wall_s_whole_run"] for run in repeats)}


def comparison(runs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Each pipeline run against the fastest TRL configuration of the same invocation (median s/step)."""
    trl = {name: run for name, run in runs.items() if run["side"] == "trl"}
    if not trl:
        return None
    fastest = min(trl, key=lambda name: trl[name]["s_per_step_median"])
    best = trl[fastest]["s_per_step_median"]
    pipeline = {name: run for name, run in runs.items() if run["side"] == "pipeline"}
    out = {"fastest_trl": fastest, "fastest_trl_s_per_step": best,
           "ratios": {name: best / run["s_per_step_median"] for name, run in pipeline.items()}}
    rounds = {len(run.get("repeats", [])) for run in runs.values()}
    if len(rounds) == 1 and (count := rounds.pop()) > 1:  # each round's ratio: how far the machine's drift moved it
        fastest_per_round = [min(run["repeats"][i]["s_per_step_median"] for run in trl.values()) for i in range(count)]
        out["ratios_per_round"] = {name: [f / r["s_per_step_median"] for f, r in zip(fastest_per_round, run["repeats"])]
                                   for name, run in pipeline.items()}
    return out


# ---- the invocations -------------------------------------------------------------------------------------

def trl_configs_here(requested: list[str], bf16_units: bool) -> tuple[list[str], list[str]]:
    """(configurations to run, those skipped: bf16 ones on a CPU without bf16 units)."""
    skipped = [c for c in requested if needs_bf16_units(c) and not bf16_units]
    return [c for c in requested if c not in skipped], skipped


def compare(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    if args.trl_configs and importlib.util.find_spec("trl") is None:
        sys.exit("bench.e2e: TRL is not installed (the `bench` extra): run `make bench-setup` first, or pass "
                 "--trl-configs with no value to measure the pipeline alone (no ratio)")
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result = {"workloads": result.get("workloads", {})}  # an older layout (a fixed reference) is dropped
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        for workload in args.workloads:
            here = machine()
            configs, skipped = trl_configs_here(args.trl_configs, here["bf16_units"])
            repeats: dict[str, list[dict[str, Any]]] = {}
            for repeat in range(args.repeats):  # in rotation: each configuration once per round
                for name, run_one in side_runs(workload, args, configs, Path(tmp) / f"r{repeat}"):
                    print(f"== {workload} (round {repeat + 1}/{args.repeats}): {name}", flush=True)
                    repeats.setdefault(name, []).append(_report(run_one()))
            runs = {name: pooled(each) for name, each in repeats.items()}
            result["workloads"][workload] = {"machine": here, "runs": runs, "comparison": comparison(runs),
                                             "rounds": args.repeats,
                                             "trl_skipped": {c: "no bf16 units (AVX512_BF16/AMX)" for c in skipped}}
            write_result(result, args.out)
    print("\n".join(e2e_table(result)))
    e2e_plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return result


def side_runs(workload: str, args: argparse.Namespace, configs: list[str], workdir: Path):
    """(name, a call running it) for one round of the invocation: the pipeline (defaults, then each variant)
    at each staleness, then TRL's configurations."""
    workdir.mkdir(parents=True, exist_ok=True)
    for staleness in args.staleness:
        for variant in ["", *args.variants]:
            name = f"{workload}-s{staleness}" + (f"-{variant}" if variant else "")
            extra = [*args.set, *PIPELINE_VARIANTS.get(variant, [])]

            def run(staleness=staleness, variant=variant, name=name, extra=extra) -> dict[str, Any]:
                result = run_pipeline(workload, staleness, workdir, args.models, extra, name=name)
                return {**result, "variant": variant} if variant else result

            yield name, run
    for config in configs:
        yield f"{workload}-trl-{config}", lambda config=config: run_trl(workload, config, workdir, args.models)


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    workload = args.scaling_workload
    points = [(p, 1, 1) for p in args.scaling_pairs]
    points += [(16, L, s) for L in args.scaling_listeners for s in (0, 1) if (16, L, s) not in points]
    result: dict[str, Any] = {"workload": workload, "machine": machine(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-scaling-") as tmp:
        for pairs, listeners, staleness in points:
            name = f"{workload}-p{pairs}-l{listeners}-s{staleness}"
            print(f"== {name}", flush=True)
            extra = [f"data.pairs_per_step={pairs}", f"listener.num_workers={listeners}", *args.set]
            run = run_pipeline(workload, staleness, Path(tmp), args.models, extra, name=name)
            result["runs"][name] = _report({**run, "pairs": pairs, "listeners": listeners})
            write_result(result, args.scaling_out)
    print("\n".join(scaling_table(result)))
    print(f"wrote {args.scaling_out}")
    return result


def _report(run: dict[str, Any]) -> dict[str, Any]:
    print(f"   {run['s_per_step_median']:.2f} s/step, {run['completions_per_s']:.2f} completions/s, "
          f"CPU {100 * run['cpu_utilisation']:.0f}%", flush=True)
    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--staleness", nargs="+", type=int, choices=[0, 1], default=[1],
                        help="the pipeline's trainer.max_staleness runs (default 1)")
    parser.add_argument("--trl-configs", nargs="*", choices=list(TRL_CONFIGS), default=list(TRL_DEFAULT_CONFIGS),
                        help="TRL configurations (bf16 ones run only where the CPU has bf16 units); none: pipeline only")
    parser.add_argument("--models", type=Path, default=MODELS, help="where make-tiny checkpoints are built/reused")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every pipeline run (recorded in each run's command)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of every configuration in rotation, pooled per configuration (tiny: 3; the "
                             "machine's speed drifts over minutes and tiny steps are half a second)")
    parser.add_argument("--variants", nargs="*", choices=list(PIPELINE_VARIANTS), default=[],
                        help="pipeline variants run beside the defaults (PIPELINE_VARIANTS), each with its own ratio")
    parser.add_argument("--scaling", action="store_true", help="the scaling sweep instead (pipeline only)")
    parser.add_argument("--scaling-workload", choices=list(WORKLOADS), default="mid")
    parser.add_argument("--scaling-pairs", nargs="+", type=int, default=list(SCALING_PAIRS))
    parser.add_argument("--scaling-listeners", nargs="+", type=int, default=list(SCALING_LISTENERS))
    parser.add_argument("--scaling-out", type=Path, default=SCALING_RESULTS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return scaling(args) if args.scaling else compare(args)


if __name__ == "__main__":
    main()
