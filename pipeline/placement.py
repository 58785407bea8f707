"""The one place that decides resources and placement: every actor of a run is created here.

Each actor kind asks for its own Ray custom resource (`rollout.resource`, `listener.resource`,
`learner.resource`, one unit per actor) besides CPUs and GPUs, so on KubeRay each kind lands on its own
worker group and the groups scale independently. The listener pool is a named actor
(`LISTENER_POOL_NAME` in `RAY_NAMESPACE`) so `python -m pipeline scale-listeners` can resize it live.
"""

from __future__ import annotations

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


def check_cluster_fits(cfg: RunConfig, available: dict[str, float]) -> None:
    """Refuse, with one line, a run the cluster cannot hold now."""
    for name, amount in required_resources(cfg).items():
        if amount > available.get(name, 0.0) + 1e-9:
            raise ConfigError(f"the run needs {amount:g} {name} but the Ray cluster has "
                              f"{available.get(name, 0.0):g} (check num_workers/num_ranks, num_gpus, num_cpus)")


def local_cluster_resources(cfg: RunConfig) -> dict[str, Any]:
    """`ray.init` arguments for a local cluster that holds exactly this run."""
    need = required_resources(cfg)
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": max(need["CPU"] + 2, 4), "resources": custom}


def create_actors(cfg: RunConfig, reasoner_path: str, listener_path: str) -> Actors:
    """Create every actor with its resources; the engines start in parallel."""
    import ray

    from actors.learner import LearnerGroup
    from actors.listener import ListenerPool
    from actors.reward import RewardAggregator
    from actors.rollout import RolloutWorker

    seed = cfg.trainer.seed
    rollout_options = _options(cfg.rollout.num_cpus, cfg.rollout.num_gpus, cfg.rollout.resource)
    rollout = [
        ray.remote(RolloutWorker).options(**rollout_options, max_restarts=-1, max_task_retries=0)
        .remote(reasoner_path, cfg.rollout.engine, seed=seed + index, num_threads=max(1, int(cfg.rollout.num_cpus)),
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
    ray.get([worker.ready.remote() for worker in rollout] + [listener_pool.ready.remote()])
    return Actors(rollout=rollout, listener_pool=listener_pool, reward=reward, learner=learner)


def _options(num_cpus: float, num_gpus: float, resource: str) -> dict[str, Any]:
    return {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": {resource: 1}}
