"""One GRPO step stage by stage, the orchestration overhead, the listener pool's scaling, peak memory.

    python -m bench.step                               # all three parts (about 6 min on 2 cores)
    python -m bench.step --parts step --steps 6        # only the step breakdown
    python -m bench.step --pool-sizes 1,2,4            # listener scores/s against pool size

1. Step breakdown (`configs/learn_cpu.yaml`, whose warm-started reasoner learns, so every step has a learner
   update and a weight sync; the random tiny reasoner of the default demo never earns a reward and skips
   both). The run's real actors are created by `pipeline.placement.create_actors` and driven by the
   driver's own `grpo_step`, unchanged. To time each stage inside its actor, the actor classes are wrapped
   here, by composition and in this benchmark only (`timed`): every call's seconds are measured in the
   actor's process around the real method. The stages' own compute time is the rollout engine's
   `generate`, the listener engines' `score`, the reward aggregator's `score`, the learner's
   `step_seconds` (measured inside the rank) and the weight sync's own seconds (learner rank 0, gather to
   engine reload). overhead = step_s - their sum (Ray calls, serialisation, waiting, the driver's own
   work); `overhead_fraction` = overhead / step_s, over the measured steps (the first step is a warm-up).
   With one rollout worker the stages run one after the other, so the sum is the critical path.
2. Listener scores/s against pool size: a real ListenerPool of L workers scores the same completions
   (well-formed reasoning of the warm start's shape); one warm-up call, then `--repeats` timed; the best
   counts. Reported with the ratio to L=1 (on a 2-core machine more workers cannot add compute).
3. Peak memory of the default demo (`python -m pipeline train`, configs/tiny_cpu.yaml, all processes
   together): the demo runs as a subprocess and every process of its tree (driver, Ray's GCS and raylet,
   every actor) is sampled every 0.5 s: the peak of the summed RSS, the peak of the summed PSS (shared
   pages counted once), and per actor kind (Ray names an actor's process `ray::Class`) the peak RSS.

Writes bench/results/step.json (`step_s`, per-stage seconds, `overhead_fraction`, `samples_per_s`,
`listener_pool`, `memory`) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "step.json"
MODELS = ROOT / "runs" / "bench-models"
STAGES = ("rollout", "listener", "reward", "learn", "sync")
GiB = 2**30


def _env() -> None:
    for key, value in dict(DS_ACCELERATOR="cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1",
                           RAY_USAGE_STATS_ENABLED="0").items():
        os.environ.setdefault(key, value)
    # Ray's workers inherit this: the wrapped actor classes below are importable there.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)


# ---- timing inside the actors ------------------------------------------------------------------------

def timed(cls: type, setup: Any = None) -> type:
    """`cls` wrapped by composition: its public methods, each adding its seconds (measured in the actor's
    process) to `call_seconds()[name]`; `setup()` runs in that process before `cls` is constructed."""

    module, class_name = cls.__module__, cls.__name__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import importlib

        if setup is not None:
            setup()
        self._seconds: dict[str, float] = {}
        # Looked up by name in the actor's process (where the module is not patched), so the class and
        # the globals of its methods are the module's own.
        self._inner = getattr(importlib.import_module(module), class_name)(*args, **kwargs)

    def wrap(name: str, method: Any) -> Any:
        if inspect.iscoroutinefunction(method):
            async def call(self, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return await getattr(self._inner, name)(*args, **kwargs)
                finally:
                    self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start
        else:
            def call(self, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return getattr(self._inner, name)(*args, **kwargs)
                finally:
                    self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start
        call.__name__ = name
        return call

    namespace: dict[str, Any] = {"__init__": __init__}
    for name, method in inspect.getmembers(cls, inspect.isfunction):
        if not name.startswith("_"):
            namespace[name] = wrap(name, method)
    async_class = any(inspect.iscoroutinefunction(m) for m in namespace.values())
    if async_class:  # an async actor: every method async, so the event loop serves them all
        async def call_seconds(self) -> dict[str, float]:
            return dict(self._seconds)
    else:
        def call_seconds(self) -> dict[str, float]:
            return dict(self._seconds)
    namespace["call_seconds"] = call_seconds
    return type(f"Timed{cls.__name__}", (), namespace)


def _time_listener_workers() -> None:
    """In the pool's process: the workers it spawns are timed too (it looks `ListenerWorker` up by name)."""
    import actors.listener as listener

    if not listener.ListenerWorker.__name__.startswith("Timed"):
        listener.ListenerWorker = timed(listener.ListenerWorker)


@contextmanager
def timed_actor_classes():
    """While active, `create_actors` builds timed rollout workers, listener pool (and its workers), reward."""
    import actors.listener
    import actors.reward
    import actors.rollout

    originals = [(actors.rollout, "RolloutWorker"), (actors.reward, "RewardAggregator"),
                 (actors.listener, "ListenerPool")]
    saved = [getattr(module, name) for module, name in originals]
    actors.rollout.RolloutWorker = timed(saved[0])
    actors.reward.RewardAggregator = timed(saved[1])
    actors.listener.ListenerPool = timed(saved[2], setup=_time_listener_workers)
    try:
        yield
    finally:
        for (module, name), value in zip(originals, saved):
            setattr(module, name, value)


class SyncReports:
    """The driver-side learner handle, keeping each weight sync's own report (its seconds)."""

    def __init__(self, group: Any) -> None:
        self._group = group
        self.reports: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)

    def sync_weights(self, *args: Any, **kwargs: Any) -> Any:
        report = self._group.sync_weights(*args, **kwargs)
        self.reports.append(report)
        return report


def inside_seconds(actors: Any) -> dict[str, float]:
    """Cumulative seconds each stage has spent inside its actors (parallel workers of a kind: the slowest)."""
    import ray

    rollout = ray.get([w.call_seconds.remote() for w in actors.rollout])
    workers = ray.get(actors.listener_pool.workers.remote())
    listener = ray.get([w.call_seconds.remote() for w in workers])
    reward = ray.get(actors.reward.call_seconds.remote())
    return {"rollout": max(s.get("generate", 0.0) for s in rollout),
            "listener": max((s.get("score", 0.0) for s in listener), default=0.0),
            "reward": reward.get("score", 0.0),
            "sync": sum(r.seconds for r in actors.learner.reports)}


# ---- 1. the step breakdown ---------------------------------------------------------------------------

def bench_step(config: Path, steps: int, models: Path) -> dict[str, Any]:
    import ray

    from pipeline.config import load_config
    from pipeline.data import PairSource
    from pipeline.driver import PolicyState, grpo_step
    from pipeline.models import resolve_checkpoint
    from pipeline.placement import RAY_NAMESPACE, create_actors, local_cluster_resources

    cfg = load_config(config, [f"trainer.steps={steps + 1}"])
    ray.init(namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False, configure_logging=False,
             **local_cluster_resources(cfg))
    try:
        reasoner = resolve_checkpoint(cfg.model.reasoner, "model.reasoner", models)
        listener = resolve_checkpoint(cfg.model.listener, "model.listener", models)
        with timed_actor_classes():
            actors = create_actors(cfg, reasoner, listener)
        actors = dataclasses.replace(actors, learner=SyncReports(actors.learner))
        source = PairSource.from_config(cfg.data, cfg.model)
        policy = PolicyState()
        rows = []
        try:
            for step in range(steps + 1):
                before = inside_seconds(actors)
                result = grpo_step(step, source.next_batch(cfg.data.pairs_per_step), actors, cfg, policy)
                after = inside_seconds(actors)
                m = result.metrics
                inside = {k: after[k] - before[k] for k in after}
                inside["learn"] = m.get("step_seconds", 0.0) if m["learn/skipped"] == 0 else 0.0
                rows.append({"step_s": m["time/step_s"], "inside": inside,
                             "driver": {s: m[f"time/{s}_s"] for s in STAGES},
                             "samples": m["throughput/samples_per_s"] * m["time/step_s"],
                             "skipped": m["learn/skipped"]})
                print(f"  step {step}: {m['time/step_s']:.2f} s, inside actors {sum(inside.values()):.2f} s"
                      f"{' (warm-up)' if step == 0 else ''}", flush=True)
        finally:
            actors.shutdown()
    finally:
        ray.shutdown()
    return summarise_steps(rows[1:], str(config))


def summarise_steps(rows: list[dict[str, Any]], config: str) -> dict[str, Any]:
    step_s = sum(r["step_s"] for r in rows)
    inside = {s: sum(r["inside"][s] for r in rows) for s in STAGES}
    driver = {s: sum(r["driver"][s] for r in rows) for s in STAGES}
    n = len(rows)
    overhead = step_s - sum(inside.values())
    return {
        "config": config, "steps": n, "step_s": step_s / n,
        "stages_s": {s: inside[s] / n for s in STAGES},
        "stages_seen_by_driver_s": {s: driver[s] / n for s in STAGES},
        "overhead_s": overhead / n, "overhead_fraction": overhead / step_s,
        "samples_per_s": sum(r["samples"] for r in rows) / step_s,
        "step_s_each": [round(r["step_s"], 3) for r in rows],
        "steps_with_update": sum(r["skipped"] == 0 for r in rows),
    }


# ---- 2. listener scores/s against pool size ----------------------------------------------------------

def listener_requests(count_pairs: int, group_size: int) -> list[Any]:
    from pipeline.prompts import format_target
    from pipeline.sft import sft_reasoning
    from pipeline.synthetic import synthetic_pairs
    from pipeline.types import ListenerRequest

    return [ListenerRequest(pair=p, completion_index=g, text=format_target(sft_reasoning(p), 1 + g % 2))
            for p in synthetic_pairs(seed=7, count=count_pairs) for g in range(group_size)]


def bench_listener_pool(model: str, sizes: list[int], repeats: int, pairs: int, group_size: int) -> dict[str, Any]:
    import ray

    from actors.listener import ListenerPool
    from pipeline.config import EngineConfig, ListenerConfig

    requests = listener_requests(pairs, group_size)
    results: dict[str, Any] = {}
    ray.init(num_cpus=max(4, max(sizes) + 2), resources={"listener": max(sizes)}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        for size in sizes:
            cfg = ListenerConfig(num_workers=size, max_in_flight=len(requests), engine=EngineConfig(dtype="float32"))
            pool = ray.remote(ListenerPool).options(num_cpus=0, max_concurrency=64).remote(model, cfg)
            ray.get(pool.ready.remote())
            ray.get(pool.score_requests.remote(requests[:size * 2]))  # warm-up on every worker
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                scores = ray.get(pool.score_requests.remote(requests))
                times.append(time.perf_counter() - start)
                assert len(scores) == len(requests)
            ray.get(pool.shutdown.remote())
            ray.kill(pool)
            results[str(size)] = {"scores_per_s": len(requests) / min(times),
                                  "median_scores_per_s": len(requests) / statistics.median(times),
                                  "seconds": [round(t, 3) for t in times]}
            print(f"  listener pool L={size}: {results[str(size)]['scores_per_s']:.1f} scores/s", flush=True)
    finally:
        ray.shutdown()
    base = results[str(sizes[0])]["scores_per_s"]
    for value in results.values():
        value["ratio_to_smallest"] = value["scores_per_s"] / base
    return {"requests": len(requests), "repeats": repeats, "sizes": results}


# ---- 3. peak memory of the default demo --------------------------------------------------------------

def actor_kind(cmdline: list[str], is_root: bool) -> str:
    """The kind of one process of a run's tree, from Ray's process titles (`ray::RolloutWorker`, ...)."""
    if is_root:
        return "driver"
    title = " ".join(cmdline)
    for cls, kind in (("RolloutWorker", "rollout"), ("ListenerWorker", "listener"), ("LearnerRank", "learner"),
                      ("ListenerPool", "listener_pool"), ("RewardAggregator", "reward")):
        if f"ray::{cls}" in title or f"ray::Timed{cls}" in title:
            return kind
    return "ray_idle_workers" if "ray::IDLE" in title else "ray_system"


def sample_tree(root: Any, peaks: dict[str, Any]) -> None:
    """One sample of `root`'s process tree into `peaks` (summed RSS and PSS, per-kind RSS)."""
    import psutil

    total_rss = total_pss = 0
    by_kind: dict[str, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            kind = actor_kind(proc.cmdline(), proc.pid == root.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total_rss += info.rss
        total_pss += getattr(info, "pss", info.rss)
        by_kind[kind] = by_kind.get(kind, 0) + info.rss
    peaks["total_rss"] = max(peaks.get("total_rss", 0), total_rss)
    peaks["total_pss"] = max(peaks.get("total_pss", 0), total_pss)
    for kind, rss in by_kind.items():
        peaks.setdefault("by_kind", {})[kind] = max(peaks.get("by_kind", {}).get(kind, 0), rss)


def bench_demo_memory(workdir: Path, interval_s: float = 0.5) -> dict[str, Any]:
    import psutil

    run_dir = workdir / "demo"
    command = [sys.executable, "-m", "pipeline", "train", f"trainer.output_dir={run_dir}",
               f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db"]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "RAY_ADDRESS": ""})
    root = psutil.Process(process.pid)
    peaks: dict[str, Any] = {}
    while process.poll() is None:
        try:
            sample_tree(root, peaks)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval_s)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the demo failed: {stderr[-2000:]}")
    return {"command": "python -m pipeline train", "wall_s": time.perf_counter() - start,
            "peak_total_rss_gib": peaks["total_rss"] / GiB, "peak_total_pss_gib": peaks["total_pss"] / GiB,
            "peak_rss_by_kind_mib": {k: round(v / 2**20) for k, v in sorted(peaks["by_kind"].items())},
            "target_gib": 8.0, "sample_interval_s": interval_s}


# ---- report ------------------------------------------------------------------------------------------

def print_table(report: dict[str, Any]) -> None:
    step = report.get("step")
    if step:
        print(f"\nstep breakdown ({step['config']}, mean of {step['steps']} steps after a warm-up)")
        print(f"{'stage':10} {'inside actor s':>15} {'seen by driver s':>17}")
        for s in STAGES:
            print(f"{s:10} {step['stages_s'][s]:>15.3f} {step['stages_seen_by_driver_s'][s]:>17.3f}")
        print(f"{'step':10} {step['step_s']:>15.3f}\noverhead {step['overhead_s']:.3f} s = "
              f"{100 * step['overhead_fraction']:.1f}% of the step (target <= 5%); "
              f"{step['samples_per_s']:.1f} samples/s end to end")
    pool = report.get("listener_pool")
    if pool:
        print(f"\nlistener pool ({pool['requests']} completions)\n{'L':>3} {'scores/s':>9} {'ratio':>6}")
        for size, r in pool["sizes"].items():
            print(f"{size:>3} {r['scores_per_s']:>9.1f} {r['ratio_to_smallest']:>6.2f}")
    memory = report.get("memory")
    if memory:
        print(f"\ndefault demo peak memory: RSS {memory['peak_total_rss_gib']:.2f} GiB, PSS "
              f"{memory['peak_total_pss_gib']:.2f} GiB (target <= 8 GiB)")
        for kind, mib in memory["peak_rss_by_kind_mib"].items():
            print(f"  {kind:18} {mib:>6} MiB")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["step", "listener", "memory"],
                        choices=["step", "listener", "memory"])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "learn_cpu.yaml")
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    parser.add_argument("--pool-sizes", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", type=Path, default=MODELS, help="where tiny:// checkpoints are built/reused")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    _env()
    report: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    report.update({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)},
                   "date": time.strftime("%Y-%m-%d")})
    if "step" in args.parts:
        print("step breakdown ...", flush=True)
        step = bench_step(args.config, args.steps, args.models)
        report["step"] = step
        report.update({k: step[k] for k in ("step_s", "overhead_fraction", "samples_per_s")})
        report.update({f"{s}_s": step["stages_s"][s] for s in STAGES})
    if "listener" in args.parts:
        print("listener pool ...", flush=True)
        from pipeline.models import resolve_checkpoint

        import ray

        ray.init(num_cpus=2, resources={"learner": 1}, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # tiny://reasoner-sft may need building (a learner run)
        try:
            model = resolve_checkpoint("tiny://reasoner-sft", "listener", args.models)
        finally:
            ray.shutdown()
        sizes = [int(s) for s in args.pool_sizes.split(",")]
        report["listener_pool"] = bench_listener_pool(model, sizes, args.repeats, pairs=16, group_size=8)
    if "memory" in args.parts:
        print("default demo memory ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
            report["memory"] = bench_demo_memory(Path(tmp))
    print_table(report)
    write_result(report, args.out)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
