"""The listener experiment (docs/listener.md, designed before it was run): GRPO on the synthetic
`render-saturated` task on CPU, four arms x five seeds, OOD accuracy on `render-white` as the endpoint.

    python -m bench.learning                                # the whole experiment (4 arms x 5 seeds)
    python -m bench.learning --seeds 0 --arms on --steps 4  # a quick look
    python -m bench.learning --resume                       # keep the runs already finished under --workdir
    python -m bench.learning --parallel 1                   # one run at a time

Runs go side by side, each on `--cores-per-run` cores (1: its rollout worker, listener and learner one thread
each; `LISTENER_GRPO_CORES`), as many at once as the cores and memory allow (`default_parallel`). A run
alone leaves a core idle a third of the time (its evaluations generate on one thread, its start is
mostly serial: 70% busy on 2 cores); two one-core runs keep both busy (97%). A run's threads are fixed,
so its numbers do not depend on what runs beside it or on the machine's core count.

Arms (`reward.listener_signal`, `reward.w_listener`): off (0), on (the listener's p, 0.5), oracle (the
oracle faithfulness of the reasoning's image descriptions, 0.5), placebo (the listener's p shuffled
across the step's completions, 0.5). Seed s sets trainer.seed and data.seed (so the training stream and
the evaluation pairs); seeds in `--warm-seeds` get warm starts of their own (reasoner and listener, from
tiny random models of their own seed, SFT seed s), the others seed 0's. Every run is the real CLI,
`python -m pipeline train --config configs/learn_cpu.yaml ...`, in a subprocess, on policy
(max_staleness 0: repeatable). Every evaluation (greedy, 256 held-out and 256 OOD pairs) is scored by the
run's listener; the last one's completions also by a second listener built with another seed
(`--agreement-seed`), never used in training (transformers, float32).

Writes bench/results/learning.json (every arm x seed, the endpoint per arm and the paired differences
on - off, on - placebo, on - oracle with 95% bootstrap intervals, the OOD format rate and accuracy among
well-formed answers, the agreement split of both listeners on held-out and OOD per arm) and
bench/results/learning.png; prints a table and the run time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import write_result
from bench.learning_report import SPLITS, as_float, markdown, plot, print_table, summarise
from bench.learning_stats import ENDPOINT_EVALS, agreement_split, endpoint, experiment_verdict

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "learning.json"
PLOT = ROOT / "bench" / "results" / "learning.png"
CONFIG = ROOT / "configs" / "learn_cpu.yaml"
ARMS = {"off": ["reward.w_listener=0"],
        "on": ["reward.w_listener=0.5", "reward.listener_signal=listener"],
        "oracle": ["reward.w_listener=0.5", "reward.listener_signal=oracle"],
        "placebo": ["reward.w_listener=0.5", "reward.listener_signal=placebo"]}
REASONER_SETTINGS = {"faithful_rate": 1.0}  # the primary setting: faithful descriptions from the start (the
#                                           default tiny://reasoner-sft swaps them half the time; docs/listener.md)
TINY_SEED_STRIDE = 1000  # warm-start seed w's tiny random models: the role's seed + w * stride
RUN_MEMORY_GIB = 7.0  # one run's peak resident memory, with headroom (two runs side by side peaked at 12 GiB)


def _in_repo(path: str | Path) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


# ---- warm starts -----------------------------------------------------------------------------------

def warm_start_jobs(models: Path, warm_seeds: list[int], agreement_seed: int | None) -> tuple[dict, list]:
    """{(role, seed): dir} of the warm starts of `warm_seeds` (and of the agreement listener) and the SFT jobs
    still to run for them."""
    from pipeline.sft import MANIFEST, default_settings
    from pipeline.tiny import ROLE_SEEDS, make_tiny

    def wanted(role: str, seed: int) -> tuple[Path, Any]:
        settings = replace(default_settings(role), seed=seed, **REASONER_SETTINGS if role == "reasoner" else {})
        name = "tiny-reasoner-sft-faithful" if role == "reasoner" else f"tiny-{role}-sft"
        return models / (name if seed == 0 else f"{name}-seed{seed}"), settings

    dirs: dict[Any, Any] = {}
    jobs = []
    pending = [(role, seed) for seed in warm_seeds for role in ("reasoner", "listener")]
    if agreement_seed is not None:
        pending.append(("listener", agreement_seed))
    for role, seed in pending:  # a seed's two warm starts side by side
        out, settings = wanted(role, seed)
        manifest = out / MANIFEST
        done = manifest.is_file() and json.loads(manifest.read_text()).get("settings") == json.loads(
            json.dumps(asdict(settings)))
        if not done:
            base = models / (f"tiny-{role}" if seed == 0 else f"tiny-{role}-seed{seed}")
            if not (base / "tiny_manifest.json").is_file():
                make_tiny(base, role=role, seed=ROLE_SEEDS[role] + seed * TINY_SEED_STRIDE)
            jobs.append((base, out, settings, role))
        dirs[(role, seed)] = str(out)
    return dirs, jobs


def build_warm_starts(models: Path, warm_seeds: list[int], agreement_seed: int | None = None) -> dict:
    """Build what is missing, two at a time (each SFT learner is one thread; the machine has two cores)."""
    from pipeline.sft import warm_starts

    dirs, jobs = warm_start_jobs(models, warm_seeds, agreement_seed)
    for i in range(0, len(jobs), 2):
        warm_starts(jobs[i:i + 2])
    return dirs


# ---- one run ---------------------------------------------------------------------------------------

def run_overrides(arm: str, seed: int, args: argparse.Namespace, warm: tuple[str, str]) -> list[str]:
    return [*ARMS[arm], f"trainer.seed={seed}", f"data.seed={seed}", f"trainer.steps={args.steps}",
            f"trainer.eval_every={args.eval_every}", f"data.eval_pairs={args.eval_pairs}",
            "trainer.max_staleness=0", f"model.reasoner={warm[0]}", f"model.listener={warm[1]}", *args.set]


def default_parallel(cores: int, cores_per_run: int, available_gib: float) -> int:
    """Runs at once: as many as the cores hold at `cores_per_run` each and the memory at RUN_MEMORY_GIB each,
    at least one."""
    return max(1, min(cores // max(1, cores_per_run), int(available_gib // RUN_MEMORY_GIB)))


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return RUN_MEMORY_GIB  # unknown: one run


def train(arm: str, seed: int, overrides: list[str], workdir: Path, cores: int) -> Path:
    """One `python -m pipeline train` run from scratch on `cores` cores; returns its run directory."""
    run_dir = workdir / f"{arm}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "train", "--config", str(CONFIG), f"trainer.output_dir={run_dir}",
               f"tracking.tracking_uri=sqlite:///{workdir}/mlflow.db", f"tracking.run_name=learning-{arm}-{seed}",
               *overrides]
    print(f"{time.strftime('%H:%M:%S')} {arm} seed {seed}: {' '.join(command[1:])}", flush=True)
    log = workdir / f"{arm}-seed{seed}.log"
    with log.open("w") as out:
        result = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "RAY_ADDRESS": "", "LISTENER_GRPO_CORES": str(cores)})
    if result.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed (exit {result.returncode}); see {log}")
    return run_dir


CURVE_KEYS = ("accuracy", "format_rate", "accuracy_well_formed", "faithful", "listener/p_preferred",
              "listener/contradiction_rate", "listener/accuracy_when_agree", "listener/accuracy_when_contradict")
TRAIN_KEYS = {"reward_accuracy": "reward/accuracy", "reward_listener": "reward/listener",
              "faithful": "reward/faithful", "contradiction_rate": "listener/contradiction_rate",
              "listener_p": "listener/p_preferred", "step_s": "time/step_s"}


def run_record(run_dir: Path) -> dict[str, Any]:
    """Curves and endpoint figures of one run, from RUN_DIR/metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {r["step"]: r for r in rows if "eval/accuracy" in r}
    train_rows = sorted((r["step"], r) for r in rows if "reward/mean" in r)
    curve = [{"step": s, **{f"{split}/{k}": evals[s].get(f"{prefix}/{k}") for split, prefix in SPLITS.items()
                            for k in CURVE_KEYS}} for s in sorted(evals)]
    record = {"curve": curve,
              "train": [{"step": s, **{k: r.get(m) for k, m in TRAIN_KEYS.items()}} for s, r in train_rows],
              "endpoint": {f"{split}/{k}": endpoint({p["step"]: as_float(p[f"{split}/{k}"]) for p in curve})
                           for split in SPLITS for k in ("accuracy", "format_rate", "accuracy_well_formed",
                                                         "faithful", "listener/contradiction_rate")},
              "start": {f"{split}/accuracy": curve[0][f"{split}/accuracy"] for split in SPLITS},
              "eval_steps": sorted(evals)}
    record["agreement_listener1"] = {split: agreement_split(_table_rows(run_dir, prefix, sorted(evals)[-ENDPOINT_EVALS:]))
                                     for split, prefix in SPLITS.items()}
    return record


def with_summary_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The per-run fields bench/report.py reads (held-out accuracy as `accuracy` in the curve, start, end,
    first update >= 90%, updates)."""
    curve = [{**p, "accuracy": p["heldout/accuracy"], "ood_accuracy": p["ood/accuracy"]} for p in record["curve"]]
    return {**record, "curve": curve, "acc_start": curve[0]["accuracy"], "acc_end": curve[-1]["accuracy"],
            "steps": curve[-1]["step"], "ood_end": curve[-1]["ood_accuracy"],
            "reached_90_at": next((p["step"] for p in curve if p["accuracy"] >= 0.9), None)}


def _table_rows(run_dir: Path, prefix: str, steps: list[int], p_column: str = "listener_p_preferred"):
    for step in steps:
        table = json.loads((run_dir / prefix / f"step_{step:06d}.json").read_text())
        for answer, p, preferred in zip(table["answer"], table[p_column], table["preferred"]):
            yield answer, (None if p is None else float(p)), preferred


class SecondListener:
    """The agreement listener: p(preferred) of evaluated completions, with transformers (float32), in
    left-padded batches (the answer is read at the last position, as the pool reads it)."""

    def __init__(self, model_dir: str, batch: int = 32) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from actors.listener import answer_token_ids

        self.torch, self.batch = torch, batch
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.ids = answer_token_ids(self.processor.tokenizer)

    def p_preferred(self, items: list[tuple[Any, str]]) -> list[float | None]:
        """For each (pair, completion text): p(pair.preferred), or None when nothing is left of the reasoning
        after masking (an unusable score, as in the pool)."""
        from pipeline.prompts import listener_p_image_1, listener_prompt, mask_answer

        masked = [mask_answer(text) for _, text in items]
        todo = [i for i, m in enumerate(masked) if m]
        out: list[float | None] = [None] * len(items)
        for start in range(0, len(todo), self.batch):
            chunk = todo[start:start + self.batch]
            pairs = [items[i][0] for i in chunk]
            enc = self.processor(text=[listener_prompt(p.prompt, masked[i]) for p, i in zip(pairs, chunk)],
                                 images=[[p.image_1, p.image_2] for p in pairs], padding=True, return_tensors="pt")
            with self.torch.no_grad():
                logp_BV = self.torch.log_softmax(self.model(**enc).logits[:, -1].float(), dim=-1)  # [B, V]
            for row, (i, pair) in enumerate(zip(chunk, pairs)):
                p1 = listener_p_image_1(float(logp_BV[row, self.ids[0]]), float(logp_BV[row, self.ids[1]]))
                out[i] = p1 if pair.preferred == 1 else 1.0 - p1
        return out


def listener_check(listener: SecondListener, pairs_per_task: int = 64) -> dict[str, dict]:
    """How a listener reads, on held-out pairs of the training and OOD tasks: mean p(preferred) and the
    fraction of pairs it sends to the image the text supports, for the faithful reasoning, the same with the
    two descriptions swapped (supports the other image) and an empty one (the images alone)."""
    from pipeline.heldout import HELDOUT_SEED_OFFSET
    from pipeline.prompts import format_target
    from pipeline.sft import sft_reasoning
    from pipeline.synthetic import synthetic_pairs

    out: dict[str, dict] = {}
    for task in ("render-saturated", "render-white"):
        pairs = list(synthetic_pairs(HELDOUT_SEED_OFFSET, pairs_per_task, task=task))
        out[task] = {}
        for reading, text_of in (("faithful", sft_reasoning), ("swapped", lambda p: sft_reasoning(p, swap=True)),
                                 ("empty", lambda p: "-")):
            ps = listener.p_preferred([(p, format_target(text_of(p), 1)) for p in pairs])
            toward = [(x > 0.5) if reading != "swapped" else (x < 0.5) for x in ps]
            out[task][reading] = {"p_preferred_mean": float(np.mean(ps)), "accuracy": float(np.mean(toward))}
    return out


def second_listener_split(listener: SecondListener, run_dir: Path, overrides: list[str], step: int) -> dict:
    """The agreement split of the second listener on the run's evaluation at `step`, held-out and OOD."""
    from pipeline.config import load_config
    from pipeline.heldout import heldout_pairs, ood_heldout_pairs

    cfg = load_config(CONFIG, [o for o in overrides if not o.startswith("model.")])
    pairs = {p.pair_id: p for p in [*heldout_pairs(cfg.data, cfg.model), *ood_heldout_pairs(cfg.data, cfg.model)]}
    out = {}
    for split, prefix in SPLITS.items():
        table = json.loads((run_dir / prefix / f"step_{step:06d}.json").read_text())
        ps = listener.p_preferred([(pairs[pid], text) for pid, text in zip(table["pair_id"], table["text"])])
        out[split] = agreement_split(zip(table["answer"], ps, table["preferred"]))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--warm-seeds", nargs="+", type=int, default=[0, 1],
                        help="seeds with warm starts of their own; the others use seed 0's")
    parser.add_argument("--agreement-seed", type=int, default=100, help="SFT seed of the second listener")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-pairs", type=int, default=256)
    parser.add_argument("--models", type=Path, default=ROOT / "runs" / "bench-models")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-learning")
    parser.add_argument("--resume", action="store_true", help="keep runs already recorded under --workdir")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs already recorded under --workdir (e.g. a partial experiment)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--cores-per-run", type=int, default=1,
                        help="threads of each run's rollout worker, listener and learner (LISTENER_GRPO_CORES)")
    parser.add_argument("--parallel", type=int, default=0,
                        help="runs at once (0: as many as the cores and memory hold, default_parallel)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for key, value in dict(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0").items():
        os.environ.setdefault(key, value)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    warm_seed = {seed: seed if seed in args.warm_seeds else 0 for seed in args.seeds}
    dirs = warm_starts(args, sorted(set(warm_seed.values())))
    build_s = time.perf_counter() - start
    runs, todo = recorded_and_todo(args, dirs, warm_seed)
    parallel = args.parallel or default_parallel(len(os.sched_getaffinity(0)), args.cores_per_run, _available_gib())
    if todo:
        print(f"{len(todo)} runs, {parallel} at a time, {args.cores_per_run} core(s) each", flush=True)
        _prepare_store(args.workdir)
    runs.update(run_all(todo, args, warm_seed, parallel))
    runs = {f"{arm}/seed{seed}": runs[f"{arm}/seed{seed}"] for seed in args.seeds for arm in args.arms
            if f"{arm}/seed{seed}" in runs}  # seed-major, whatever order they finished in
    add_second_listener_splits(runs, dirs, args)
    report = build_report(runs, dirs, args, build_s=build_s, parallel=parallel if todo else None, started=start)
    print_table(report["arms_summary"], report["contrasts"])
    write_result(report, args.out)
    args.out.with_suffix(".md").write_text(markdown(report))
    plot(report["runs"], args.arms, args.plot)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.plot}; run time {report['wall_s'] / 60:.1f} min "
          f"(warm starts {build_s / 60:.1f} min)")
    return report


def warm_starts(args: argparse.Namespace, seeds: list[int]) -> dict:
    """Every warm start, built first, two at a time (--report-only only names those that exist)."""
    if not args.report_only:
        return build_warm_starts(args.models, seeds, args.agreement_seed)
    return {k: d for k, d in warm_start_jobs(args.models, seeds, args.agreement_seed)[0].items()
            if (Path(d) / "config.json").is_file()}


def recorded_and_todo(args: argparse.Namespace, dirs: dict, warm_seed: dict[int, int]
                      ) -> tuple[dict[str, dict], list[tuple[str, int, list[str]]]]:
    """The runs already recorded under --workdir (with --resume or --report-only) and those left to run,
    seed-major: a stopped experiment has whole seeds."""
    runs: dict[str, dict] = {}
    todo = []
    for seed in args.seeds:
        warm = (dirs.get(("reasoner", warm_seed[seed]), ""), dirs.get(("listener", warm_seed[seed]), ""))
        for arm in args.arms:
            saved = args.workdir / f"{arm}-seed{seed}.json"
            if (args.resume or args.report_only) and saved.is_file():
                runs[f"{arm}/seed{seed}"] = json.loads(saved.read_text())
            elif not args.report_only:
                todo.append((arm, seed, run_overrides(arm, seed, args, warm)))
    return runs, todo


def add_second_listener_splits(runs: dict[str, dict], dirs: dict, args: argparse.Namespace) -> None:
    """The second listener reads each run's last evaluation (a run that has its split keeps it)."""
    if ("listener", args.agreement_seed) not in dirs:
        return
    second = SecondListener(dirs[("listener", args.agreement_seed)])
    for record in runs.values():
        if "agreement_listener2" not in record:
            run_dir = args.workdir / f"{record['arm']}-seed{record['seed']}"
            record["agreement_listener2"] = second_listener_split(second, run_dir, record["overrides"],
                                                                  record["eval_steps"][-1])
            write_result(record, args.workdir / f"{record['arm']}-seed{record['seed']}.json")


def build_report(runs: dict[str, dict], dirs: dict, args: argparse.Namespace, build_s: float,
                 parallel: int | None, started: float) -> dict[str, Any]:
    """learning.json: the design, the runs (portable), the endpoint per arm, the contrasts and the verdict."""
    checks = {f"listener/seed{seed}": listener_check(SecondListener(d)) for (role, seed), d in sorted(dirs.items())
              if role == "listener" and (Path(d) / "sft_manifest.json").is_file()}
    used = _warm_starts_used(runs)
    runs = {key: with_summary_fields(_portable(record)) for key, record in runs.items()}
    summary, contrasts = summarise(runs, args.arms)
    return {
        "design": "docs/listener.md", "config": "configs/learn_cpu.yaml", "arms": {a: ARMS[a] for a in args.arms},
        "seeds": args.seeds, "warm_seeds": args.warm_seeds, "agreement_listener_seed": args.agreement_seed,
        "steps": args.steps, "eval_every": args.eval_every, "eval_pairs": args.eval_pairs, "overrides": args.set,
        "endpoint": f"OOD accuracy (eval_ood/accuracy) averaged over the last {ENDPOINT_EVALS} evaluations",
        "contrasts": contrasts, "verdict": experiment_verdict(contrasts), "arms_summary": summary,
        "listener_checks": checks,
        "warm_starts": {f"{role}/seed{seed}": _in_repo(d) for (role, seed), d in dirs.items()},
        "warm_starts_used": used,
        "commit": _commit(),
        "warm_start_build_s": round(build_s, 1), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
        "parallel": parallel, "cores_per_run": args.cores_per_run,  # parallel None: nothing ran here
        "wall_s": round(time.perf_counter() - started, 1),  # this invocation (a --report-only one runs nothing)
        "runs_wall_s": round(sum(r.get("wall_s", 0.0) for r in runs.values()), 1),  # the runs' own, summed
        "runs": runs,
    }


def run_all(todo: list[tuple[str, int, list[str]]], args: argparse.Namespace, warm_seed: dict[int, int],
            parallel: int) -> dict[str, dict]:
    """The runs in `todo`, `parallel` at a time; each one's record is saved as it finishes. The first failure
    stops the runs not yet started and is raised once the running ones end (their records kept)."""
    def one(arm: str, seed: int, overrides: list[str]) -> tuple[str, dict]:
        t_run = time.perf_counter()
        run_dir = train(arm, seed, overrides, args.workdir, args.cores_per_run)
        record = run_record(run_dir)
        record.update(seed=seed, arm=arm, warm_start_seed=warm_seed[seed], cores=args.cores_per_run,
                      wall_s=round(time.perf_counter() - t_run, 1), overrides=overrides,
                      command="python -m pipeline train --config configs/learn_cpu.yaml "
                      + " ".join(_in_repo_override(o) for o in overrides))
        write_result(record, args.workdir / f"{arm}-seed{seed}.json")
        return f"{arm}/seed{seed}", record

    done: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="run") as pool:
        pending = {pool.submit(one, *job) for job in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed = [f for f in finished if f.exception() is not None]
            for future in finished - set(failed):
                key, record = future.result()
                done[key] = record
                print(f"{time.strftime('%H:%M:%S')} {key} done ({len(done)}/{len(todo)}, "
                      f"{record['wall_s'] / 60:.1f} min)", flush=True)
            if failed:
                for future in pending:
                    future.cancel()
                wait(pending)
                raise failed[0].exception()
    return done


def _prepare_store(workdir: Path) -> None:
    """The experiment's sqlite store and MLflow experiment, made before runs that start together would race
    to create them."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    name = load_config(CONFIG, []).tracking.experiment
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name)


def _warm_starts_used(runs: dict[str, dict]) -> dict[str, Any]:
    """Each warm start the runs read (their model.* overrides) and its SFT manifest."""
    used = sorted({o.partition("=")[2] for r in runs.values() for o in r.get("overrides", [])
                   if o.startswith(("model.reasoner=", "model.listener="))})
    return {_cut_to_runs(d): _cut_to_runs(json.loads((Path(d) / "sft_manifest.json").read_text()))
            for d in used if (Path(d) / "sft_manifest.json").is_file()}


def _portable(record: dict[str, Any]) -> dict[str, Any]:
    """The record with machine paths in its overrides and command cut to what follows their `runs/`
    (results are committed; the runs read their warm starts from the checkout's runs/)."""
    return {**record, "overrides": _cut_to_runs(record.get("overrides", [])),
            "command": _cut_to_runs(record.get("command", ""))}


def _cut_to_runs(value: Any) -> Any:
    """Every string in `value` (nested lists and dicts too) with a machine path cut to what follows `runs/`."""
    if isinstance(value, str):
        return re.sub(r"/[^\s\"']*?/(runs/)", r"\1", value)
    if isinstance(value, list):
        return [_cut_to_runs(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut_to_runs(v) for k, v in value.items()}
    return value


def _commit() -> str:
    """The commit the code ran from: ROOT/COMMIT in a `git archive` export, else git's HEAD."""
    if (ROOT / "COMMIT").is_file():
        return (ROOT / "COMMIT").read_text().strip()
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _in_repo_override(override: str) -> str:
    key, _, value = override.partition("=")
    return f"{key}={_in_repo(value)}" if key.startswith("model.") else override


if __name__ == "__main__":
    main()
