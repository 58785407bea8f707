"""Chaos soak (not in CI): a long tiny run with faults injected at random times, checked against an
undisturbed run of the same seed.

    python -m bench.soak --steps 300                  # the full soak (about 30 min on 2 cores, see docs/reliability.md)
    python -m bench.soak --steps 30 --faults 1        # a short one (about 6 min)

Two runs of `python -m pipeline train` (each its own local Ray cluster, real vLLM CPU engines, the DeepSpeed
learner, the tiny warm starts): an undisturbed reference, then the same config and seed while this script
injects `--faults` of each kind at seeded random steps, at a random moment within the step:
- a rollout worker SIGKILLed (Ray restarts it; the driver re-syncs it and regenerates its shard);
- a listener worker SIGKILLed (the pool replaces it and retries its requests);
- a learner rank SIGKILLed: the run exits 3 and this script resumes it (`train --resume RUN_DIR`) at once;
- the MLflow server stopped, then restarted `--outage-s` later on the same port (the run buffers its metrics).

Reported (printed and written to `--out`, JSON): steps completed, restarts of each kind, pairs lost and
pairs trained twice (from `data/position` of the last attempt of every step: the steps a resume re-ran
count once; goal zero), data positions equal to the reference's at every step, metrics equal to the
reference's until the first fault (after it a restarted engine samples differently), and every step's
metrics present on the MLflow server after the outage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("rollout", "listener", "learner", "mlflow")
PROCESS = {"rollout": "ray::RolloutWorker", "listener": "ray::ListenerWorker", "learner": "ray::LearnerRank"}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_ADDRESS": ""}  # each run starts its own local cluster
# Metrics that depend on time, process counters or the MLflow server, not on the data and the policy.
NOT_COMPARED = ("time/", "throughput/", "listener/", "rollout/restarts", "sync/gather_s", "sync/transfer_s",
                "sync/load_s", "sync/total_s", "memory/", "timestamp_ms", "step_seconds", "tokens_per_s")


@dataclass
class Fault:
    step: int  # injected once the run has logged this step
    kind: str
    delay_s: float  # into the next step
    done_at_s: float = -1.0


def plan_faults(steps: int, per_kind: int, seed: int) -> list[Fault]:
    """`per_kind` faults of each kind at seeded random steps in [2, steps - 3] (MLflow outages in the first
    half, so the server is back while steps still flush what was kept), in step order."""
    rng = random.Random(seed)
    faults = [Fault(rng.randrange(2, max(3, (steps // 2 if kind == "mlflow" else steps - 2))), kind,
                    round(rng.uniform(0.0, 1.5), 2)) for kind in KINDS for _ in range(per_kind)]
    return sorted(faults, key=lambda f: (f.step, KINDS.index(f.kind)))


class MlflowServer:
    """A real `mlflow server` with a sqlite store on a fixed port, so it can be stopped and started again."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.uri, self.process = root, f"http://127.0.0.1:{port}", None
        self._args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                      "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                      "--artifacts-destination", str(root / "artifacts")]

    def start(self, timeout_s: float = 120.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(self._args, env=env, stdout=subprocess.DEVNULL, start_new_session=True,
                                        stderr=(self.root / "server.log").open("a"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not come up; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        self.process = None


def read_rows(run_dir: Path) -> list[dict]:
    """The run's local metric rows; a line still being written is left for the next read."""
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def last_attempts(rows: list[dict]) -> dict[int, dict]:
    """step -> the row of its last attempt (a step re-run after a resume is logged twice)."""
    return {row["step"]: row for row in rows if "data/position" in row}


def data_accounting(lineage: dict[int, dict], steps: int, pairs_per_step: int) -> dict[str, int]:
    """Pairs lost (a gap between consecutive steps' positions) and trained twice (an overlap), from
    `data/position` (candidates read) less the candidates skipped as bad rows."""
    lost = twice = 0
    previous = 0.0
    previous_skipped = 0.0
    for step in range(steps):
        row = lineage.get(step)
        if row is None:
            lost += pairs_per_step
            continue
        skipped = sum(v for k, v in row.items() if k.startswith("data/skipped_"))
        used = (row["data/position"] - previous) - (skipped - previous_skipped)
        lost += max(0, pairs_per_step - int(used))
        twice += max(0, int(used) - pairs_per_step)
        previous, previous_skipped = row["data/position"], skipped
    return {"pairs_lost": lost, "pairs_trained_twice": twice}


def compare(reference: dict[int, dict], disturbed: dict[int, dict], first_fault_step: int) -> dict:
    """Data positions at every step, and every compared metric until the first fault."""
    positions_equal = all(disturbed.get(s, {}).get("data/position") == row["data/position"]
                          for s, row in reference.items())
    differing = []
    for step in sorted(s for s in reference if s < first_fault_step):
        keys = [k for k in reference[step] if not k.startswith(NOT_COMPARED) and k != "step"]
        differing += [f"{step}:{k}" for k in keys if reference[step][k] != disturbed.get(step, {}).get(k)
                      and reference[step][k] == reference[step][k]]  # NaN == NaN is not a difference
    tail = [s for s in reference if s in disturbed and s >= first_fault_step]
    gap = [abs(reference[s].get("reward/mean", 0.0) - disturbed[s].get("reward/mean", 0.0)) for s in tail]
    return {"positions_equal_every_step": positions_equal, "metrics_differing_before_first_fault": differing[:20],
            "reward_mean_abs_gap_after_first_fault": sum(gap) / len(gap) if gap else 0.0}


def run_train(overrides: list[str], log: Path, resume: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "train", *overrides] + (["--resume", str(resume)] if resume else [])
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL,
                            stderr=log.open("a"))


def kill_actor(root_pid: int, kind: str) -> bool:
    """SIGKILL one process of actor class `kind` in the run started as `root_pid` (its local Ray cluster
    descends from it); False if none was found."""
    for process in psutil.Process(root_pid).children(recursive=True):
        try:
            if process.cmdline() and process.cmdline()[0].startswith(PROCESS[kind]):
                process.send_signal(signal.SIGKILL)
                return True
        except psutil.Error:
            continue
    return False


def soak_overrides(args: argparse.Namespace, run_dir: Path, warm: dict[str, str], tracking_uri: str) -> list[str]:
    return [f"trainer.steps={args.steps}", f"trainer.output_dir={run_dir}", f"trainer.seed={args.seed}",
            f"data.seed={args.seed}", f"data.pairs_per_step={args.pairs}", "rollout.group_size=4",
            "rollout.max_new_tokens=32", "trainer.checkpoint_every=1", "trainer.sample_table_every=10",
            "rollout.max_restarts=1000",  # the soak's rollout kills must not stop the run
            "rollout.engine.dtype=float32", "listener.engine.dtype=float32",  # the same numbers on every CPU
            f"model.reasoner={warm['reasoner']}", f"model.listener={warm['listener']}",
            f"tracking.tracking_uri={tracking_uri}", "tracking.experiment=soak"]


def disturbed_run(overrides: list[str], run_dir: Path, faults: list[Fault], server: MlflowServer,
                  outage_s: float, log: Path) -> dict:
    """Run to the end, injecting `faults`; a run that exits 3 (an actor died: the learner kill) is resumed."""
    t0 = time.monotonic()
    process, resumes, missed = run_train(overrides, log), 0, []
    pending, attempt_start = list(faults), 0  # rows of earlier attempts do not say this one is running
    while True:
        code = process.poll()
        if code is not None:
            if code == 0:
                break
            if code != 3 or resumes > len(faults):
                raise RuntimeError(f"the disturbed run exited {code}; see {log}")
            resumes += 1
            attempt_start = len(read_rows(run_dir))
            process = run_train(overrides, log, resume=run_dir)
            continue
        logged = max((row["step"] for row in read_rows(run_dir)[attempt_start:]), default=-1)
        if pending and logged >= pending[0].step:
            fault = pending.pop(0)
            time.sleep(fault.delay_s)
            fault.done_at_s = time.monotonic() - t0
            if fault.kind == "mlflow":
                server.stop()
                threading.Timer(outage_s, server.start).start()
            elif not kill_actor(process.pid, fault.kind):
                missed.append(asdict(fault))
        time.sleep(0.1)
    deadline = time.monotonic() + outage_s + 180
    while server.process is None and time.monotonic() < deadline:  # an outage still under way: let it end
        time.sleep(0.5)
    return {"wall_s": time.monotonic() - t0, "resumes": resumes, "faults": [asdict(f) for f in faults],
            "faults_not_injected": missed, "exit_code": 0}


def mlflow_steps(uri: str, run_id: str, key: str = "data/position") -> set[int]:
    from mlflow.tracking import MlflowClient

    return {m.step for m in MlflowClient(uri).get_metric_history(run_id, key)}


def build_models(specs: dict[str, str], directory: Path, log: Path) -> dict[str, str]:
    """The checkpoints of `specs` (e.g. tiny://reasoner-sft), built once into `directory` for both runs
    (`pipeline.models.resolve_checkpoints`: kept while built with today's settings)."""
    code = ("import json, sys; from pathlib import Path; from pipeline.models import resolve_checkpoints; "
            "print(json.dumps(resolve_checkpoints(json.loads(sys.argv[1]), Path(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(specs), str(directory)], cwd=ROOT, check=True,
                         env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=log.open("a"), text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def restarts_seen(rows: list[dict]) -> dict[str, int]:
    """Rollout and listener restarts the driver counted: each attempt's counters start at 0 and only grow,
    so a counter that falls marks a resume and the previous attempt's last value is added."""
    total = {"rollout": 0, "listener": 0}
    last = {"rollout": 0.0, "listener": 0.0}
    for row in rows:
        for kind, key in (("rollout", "rollout/restarts"), ("listener", "listener/restarts")):
            value = row.get(key, 0.0)
            if value < last[kind]:
                total[kind] += int(last[kind])
            last[kind] = value
    return {kind: total[kind] + int(last[kind]) for kind in total}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="GRPO steps of each run (default 300).")
    parser.add_argument("--faults", type=int, default=3, help="Faults of each kind injected (default 3).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of both runs and of the fault plan.")
    parser.add_argument("--pairs", type=int, default=4, help="Pairs per step (G = 4).")
    parser.add_argument("--outage-s", type=float, default=10.0, help="How long the MLflow server stays down.")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "soak", help="Runs and logs go here.")
    parser.add_argument("--reasoner", default="tiny://reasoner-sft", help="Reasoner checkpoint (default the "
                        "format warm start, so every step learns).")
    parser.add_argument("--listener", default="tiny://listener", help="Listener checkpoint.")
    parser.add_argument("--models", type=Path, default=None, help="Where tiny:// checkpoints are built once "
                        "(default WORKDIR/models; kept between soaks).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    for stale in ("reference", "disturbed", "mlflow"):
        subprocess.run(["rm", "-rf", str(work / stale)], check=True)
    (work / "mlflow").mkdir(parents=True)
    log = work / "soak.log"
    warm = build_models({"reasoner": args.reasoner, "listener": args.listener},
                        (args.models or work / "models").resolve(), log)
    t0 = time.monotonic()
    reference_dir, disturbed_dir = work / "reference", work / "disturbed"
    reference = run_train(soak_overrides(args, reference_dir, warm, f"sqlite:///{work}/reference.db"), log)
    if reference.wait() != 0:
        raise RuntimeError(f"the reference run failed; see {log}")
    reference_s = time.monotonic() - t0
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = MlflowServer(work / "mlflow", port)
    server.start()
    faults = plan_faults(args.steps, args.faults, args.seed)
    try:
        report = disturbed_run(soak_overrides(args, disturbed_dir, warm, server.uri), disturbed_dir, faults, server,
                               args.outage_s, log)
        run_id = (disturbed_dir / "mlflow_run_id").read_text().strip()
        on_server = mlflow_steps(server.uri, run_id)
    finally:
        server.stop()
    rows = read_rows(disturbed_dir)
    lineage, ref_lineage = last_attempts(rows), last_attempts(read_rows(reference_dir))
    first_fault = min((f.step for f in faults), default=args.steps) + 1  # faults land in the step after it
    report.update({
        "steps": args.steps, "seed": args.seed, "faults_per_kind": args.faults, "reference_wall_s": reference_s,
        "steps_completed": len(lineage), "steps_logged_twice": len(rows) - len(lineage),
        "restarts": restarts_seen(rows) | {"learner_resumes": report["resumes"]},
        **data_accounting(lineage, args.steps, args.pairs),
        **compare(ref_lineage, lineage, first_fault),
        "steps_on_mlflow_server": len(on_server & set(range(args.steps))),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=1))
    return report


if __name__ == "__main__":
    main()
