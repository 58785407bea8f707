"""The one place that decides resources and placement: every actor of a run is created here.

Each actor kind asks for its own Ray custom resource (`rollout.resource`, `listener.resource`,
`learner.resource`, one unit per actor) besides CPUs and GPUs, so on KubeRay each kind lands on its own
worker group and the groups scale independently. The listener pool is a named actor
(`LISTENER_POOL_NAME` in `RAY_NAMESPACE`) so `python -m pipeline scale-listeners` can resize it live.

On an existing cluster (`ray job submit`) `wait_for_resources` asks the autoscaler for every actor's
resources and waits at most `trainer.startup_timeout_s`; the engines then get the same time to come up.
Either wait ending stops the run with one line naming the resources the cluster did not provide.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, RunConfig

RAY_NAMESPACE = "listener-grpo"
LISTENER_POOL_NAME = "listener-pool"


@dataclass
class Actors:
    """Handles to every actor of a run."""

    rollout: list[Any]  # RolloutWorker actors, data parallel over pairs
    listener_pool: Any  # the named ListenerPool actor
    reward: Any  # RewardAggregator actor
    learner: Any  # LearnerGroup (driver-side handle over W LearnerRank actors)

    def shutdown(self) -> None:
        """Stop every actor of the run (the named pool too, so a new run in this cluster can take the name)."""
        import ray

        self.learner.shutdown()
        try:
            ray.get(self.listener_pool.shutdown.remote(), timeout=60)
        except Exception:  # a dead pool has nothing left to stop
            pass
        for actor in [self.listener_pool, self.reward, *self.rollout]:
            ray.kill(actor, no_restart=True)


def required_resources(cfg: RunConfig) -> dict[str, float]:
    """What the run needs from the cluster, by resource name (CPU, GPU, custom)."""
    need: dict[str, float] = {"CPU": 0.0, "GPU": 0.0}
    kinds = [(cfg.rollout, cfg.rollout.num_workers), (cfg.listener, cfg.listener.num_workers),
             (cfg.learner, cfg.learner.num_ranks)]
    for section, count in kinds:
        need["CPU"] += section.num_cpus * count
        need["GPU"] += section.num_gpus * count
        need[section.resource] = need.get(section.resource, 0.0) + count
    return need


def missing_resources(cfg: RunConfig, available: dict[str, float]) -> dict[str, tuple[float, float]]:
    """name -> (needed, available) for every resource the cluster holds too little of."""
    return {name: (amount, available.get(name, 0.0)) for name, amount in required_resources(cfg).items()
            if amount > available.get(name, 0.0) + 1e-9}


def describe_missing(missing: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{name} (needs {need:g}, cluster has {have:g})" for name, (need, have) in missing.items())


def check_cluster_fits(cfg: RunConfig, available: dict[str, float]) -> None:
    """Refuse, with one line, a run the cluster cannot hold now."""
    for name, (amount, have) in missing_resources(cfg, available).items():
        raise ConfigError(f"the run needs {amount:g} {name} but the Ray cluster has {have:g} "
                          f"(check num_workers/num_ranks, num_gpus, num_cpus)")


def actor_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """One resource bundle per engine/rank actor, as the autoscaler's request_resources takes them."""
    bundles = []
    for section, count in ((cfg.rollout, cfg.rollout.num_workers), (cfg.listener, cfg.listener.num_workers),
                           (cfg.learner, cfg.learner.num_ranks)):
        bundle = {"CPU": section.num_cpus, "GPU": section.num_gpus, section.resource: 1.0}
        bundles += [{k: v for k, v in bundle.items() if v > 0}] * count
    return bundles


def wait_for_resources(cfg: RunConfig, poll_s: float = 1.0) -> None:
    """On an existing cluster: ask the autoscaler for the run's actors, then wait until the cluster holds
    them; after `trainer.startup_timeout_s` raise one line naming what is still missing."""
    import ray
    from ray.autoscaler.sdk import request_resources

    timeout_s = cfg.trainer.startup_timeout_s
    deadline = time.monotonic() + timeout_s
    request_resources(bundles=actor_bundles(cfg))
    try:
        while missing := missing_resources(cfg, ray.cluster_resources()):
            if time.monotonic() >= deadline:
                raise ConfigError(f"the Ray cluster did not provide the run's resources within {timeout_s:g} s "
                                  f"(trainer.startup_timeout_s): {describe_missing(missing)}; check that a "
                                  f"worker group advertises each and can grow that far")
            time.sleep(poll_s)
    finally:
        request_resources(bundles=[])  # the actors' own demand takes over; scale-down stays possible


def local_cluster_resources(cfg: RunConfig) -> dict[str, Any]:
    """`ray.init` arguments for a local cluster that holds exactly this run."""
    need = required_resources(cfg)
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": max(need["CPU"] + 2, 4), "resources": custom}


def create_actors(cfg: RunConfig, reasoner_path: str, listener_path: str) -> Actors:
    """Create every actor with its resources; the engines start in parallel."""
    import ray

    from actors.engine import intra_op_threads
    from actors.learner import LearnerGroup
    from actors.listener import ListenerPool
    from actors.reward import RewardAggregator
    from actors.rollout import RolloutWorker

    seed = cfg.trainer.seed
    rollout_options = _options(cfg.rollout.num_cpus, cfg.rollout.num_gpus, cfg.rollout.resource)
    rollout = [
        ray.remote(RolloutWorker).options(**rollout_options, max_restarts=-1, max_task_retries=0)
        .remote(reasoner_path, cfg.rollout.engine, seed=seed + index,
                num_threads=intra_op_threads(cfg.rollout.num_cpus),
                trust_remote_code=cfg.model.trust_remote_code)
        for index in range(cfg.rollout.num_workers)
    ]
    listener_options = _options(cfg.listener.num_cpus, cfg.listener.num_gpus, cfg.listener.resource)
    listener_pool = ray.remote(ListenerPool).options(
        name=LISTENER_POOL_NAME, namespace=RAY_NAMESPACE, num_cpus=0, max_concurrency=64,
    ).remote(listener_path, cfg.listener, worker_options=listener_options, seed=seed,
             trust_remote_code=cfg.model.trust_remote_code)
    reward = ray.remote(RewardAggregator).options(num_cpus=0).remote(cfg.reward, cfg.algo.advantage_scaling)
    learner = LearnerGroup(
        reasoner_path, cfg.learner, cfg.algo, seed=seed, max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, trust_remote_code=cfg.model.trust_remote_code,
        actor_options=_options(cfg.learner.num_cpus, cfg.learner.num_gpus, cfg.learner.resource))
    actors = Actors(rollout=rollout, listener_pool=listener_pool, reward=reward, learner=learner)
    ready = [worker.ready.remote() for worker in rollout] + [listener_pool.ready.remote()]
    try:
        ray.get(ready, timeout=cfg.trainer.startup_timeout_s)
    except ray.exceptions.GetTimeoutError:
        missing = missing_resources(cfg, ray.cluster_resources())
        actors.shutdown()
        what = describe_missing(missing) if missing else ("the cluster holds them in total, so either no single "
                                                          "node fits an actor or the engines are still loading")
        raise ConfigError(f"the run's engines did not come up within {cfg.trainer.startup_timeout_s:g} s "
                          f"(trainer.startup_timeout_s): {what}") from None
    return actors


def _options(num_cpus: float, num_gpus: float, resource: str) -> dict[str, Any]:
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": {resource: 1}}
