"""The one place that decides resources and placement: every actor of a run is created here.

Each actor kind asks for its own Ray custom resource (`rollout.resource`, `listener.resource`,
`learner.resource`, one unit per actor) besides CPUs and GPUs, so on KubeRay each kind lands on its own
worker group and the groups scale independently. The listener pool is a named actor
(`LISTENER_POOL_NAME` in `RAY_NAMESPACE`) so `python -m pipeline scale-listeners` can resize it live.

On an existing cluster (`ray job submit`) `wait_for_resources` asks the autoscaler for every actor's
resources and waits at most `trainer.startup_timeout_s`; the engines then get the same time to come up.
Either wait ending stops the run with one line naming the resources the cluster did not provide.

GPU topology (docs/design.md "GPU topology" has the 7B arithmetic): `check_plan` refuses, one line each,
what cannot run (tensor parallelism, a GPU count an engine would not use, `sync.transport=nccl` without a
whole GPU per rank, a multiprocess engine core); the learner ranks share a placement group
(`learner.placement`: STRICT_PACK or PACK, `learner_placement_group`), so ZeRO-3's all-gathers stay on one
node's NVLink; the listener pool and the reward aggregator (no resources of their own) are pinned to the
head node (`head_node_id`), so an autoscaler removing a listener or rollout pod never takes them with it;
the weight-sync transport `auto` stands for is planned from the config (`plan_transport`). `python -m
pipeline train --print-config` prints all of it (`describe_plan`) below the config.
"""

from __future__ import annotations

import os
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
    learner_group: Any = None  # the learner ranks' placement group (None: learner.placement none)

    def shutdown(self) -> None:
        """Stop every actor of the run (the named pool too, so a new run in this cluster can take the name)."""
        import ray

        self.learner.shutdown()
        if self.learner_group is not None:
            ray.util.remove_placement_group(self.learner_group)
            self.learner_group = None
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


# ---- GPU topology: refusals, the transport, the learner's placement group, the head node ----------------

def check_plan(cfg: RunConfig, environ: Any = None) -> None:
    """Refuse, with one line, a setting the run cannot work with (before any actor starts)."""
    from actors.engine import in_process_conflict

    for name, section in (("rollout", cfg.rollout), ("listener", cfg.listener)):
        tp = section.engine.tensor_parallel_size
        if tp > 1:
            raise ConfigError(f"{name}.engine.tensor_parallel_size={tp} is not supported: each engine is one Ray "
                              f"actor whose vLLM runs on one GPU (the weight sync and the GPU requests assume it); "
                              f"use 1 and more {name}.num_workers (a 7B engine fits one 80 GB GPU)")
        if section.num_gpus > 1:
            raise ConfigError(f"{name}.num_gpus={section.num_gpus:g}: an engine uses one GPU "
                              f"(tensor_parallel_size 1); the others would sit idle")
    if cfg.sync.transport == "nccl" and (cfg.learner.num_gpus < 1 or cfg.rollout.num_gpus < 1):
        raise ConfigError(f"sync.transport=nccl needs a whole GPU per learner rank and per rollout worker (NCCL "
                          f"runs one rank per GPU), got learner.num_gpus={cfg.learner.num_gpus:g}, "
                          f"rollout.num_gpus={cfg.rollout.num_gpus:g}; use sync.transport=auto")
    if conflict := in_process_conflict(os.environ if environ is None else environ):
        raise ConfigError(conflict)


def planned_transport(cfg: RunConfig) -> str:
    """The transport `sync.transport` stands for, from the config alone ('auto': shared_memory or
    object_store, decided by where the workers are when the first sync starts)."""
    from actors.weight_sync import plan_transport

    return plan_transport(cfg.sync.transport, cfg.learner.num_gpus > 0, cfg.rollout.num_gpus > 0, None)


def learner_placement_group(cfg: RunConfig) -> tuple[list[dict[str, float]], str] | None:
    """(bundles, strategy) of the learner ranks' placement group: one bundle per rank, as the rank asks."""
    strategy = {"strict_pack": "STRICT_PACK", "pack": "PACK"}.get(cfg.learner.placement)
    if strategy is None:
        return None
    learner = cfg.learner
    bundle = {"CPU": learner.num_cpus, "GPU": learner.num_gpus, learner.resource: 1.0}
    return [{k: v for k, v in bundle.items() if v > 0} for _ in range(learner.num_ranks)], strategy


HEAD_NODE_RESOURCE = "node:__internal_head__"  # what Ray puts on the head node's resources


def head_node_id(nodes: list[dict[str, Any]]) -> str | None:
    """The head node's id in `ray.nodes()`, None if no live node carries the head marker."""
    for node in nodes:
        if node.get("Alive") and HEAD_NODE_RESOURCE in node.get("Resources", {}):
            return node["NodeID"]
    return None


def engine_processor_kwargs(cfg: RunConfig) -> dict[str, int]:
    """vLLM's `mm_processor_kwargs` for both engines: the model's pixel bounds, so vLLM profiles the vision
    encoder for the largest image the run feeds it, not the checkpoint's 12.8 MP default."""
    return {"min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels}


def describe_plan(cfg: RunConfig) -> list[str]:
    """What the run will do with its resources, one line each (`train --print-config`)."""
    transport = planned_transport(cfg)
    transport_line = {"nccl": "nccl (vLLM's weight-transfer engine: learner rank 0's GPU -> every rollout "
                              "engine's GPU, packed NCCL broadcast)",
                      "auto": "auto -> shared_memory if every rollout worker is on learner rank 0's node, "
                              "else object_store (decided at the first sync)"}.get(transport, transport)
    group = learner_placement_group(cfg)
    learner = cfg.learner
    lines = [f"sync.transport: {transport_line}",
             f"learner: {learner.num_ranks} ranks x {learner.num_gpus:g} GPU, "
             + (f"placement group {group[1]} of {len(group[0])} x {group[0][0]}" if group else "no placement group"),
             f"rollout: {cfg.rollout.num_workers} engines x {cfg.rollout.num_gpus:g} GPU (resource "
             f"'{cfg.rollout.resource}'), in-process engine core, mm_processor_kwargs {engine_processor_kwargs(cfg)}",
             f"listener: {cfg.listener.num_workers} engines x {cfg.listener.num_gpus:g} GPU (resource "
             f"'{cfg.listener.resource}'), no CUDA graphs (prefill only), max_in_flight {cfg.listener.max_in_flight} "
             f"per engine for {cfg.data.pairs_per_step * cfg.rollout.group_size} requests a step",
             "listener pool, reward aggregator: pinned to the head node (0 CPUs, 0 GPUs)",
             f"GPUs: {required_resources(cfg)['GPU']:g} in all"]
    return lines


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
    """`ray.init` arguments for a local cluster that holds exactly this run, with room for the listener pool
    to grow to its autoscaling maximum."""
    need = required_resources(cfg)
    autoscale = cfg.listener.autoscale
    extra = max(autoscale.max_workers - cfg.listener.num_workers, 0) if autoscale.enabled else 0
    need["CPU"] += cfg.listener.num_cpus * extra
    need[cfg.listener.resource] += extra
    custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": max(need["CPU"] + 2, 4), "resources": custom}


# ---- threads: each actor's torch/OpenMP intra-op threads ------------------------------------------------

@dataclass(frozen=True)
class ThreadPlan:
    """Intra-op threads of each rollout worker, each listener and each learner rank."""

    rollout: int
    listener: int
    learner: int


def local_cores(environ: Any = None) -> int | None:
    """The cores this process may run on when the run starts its own local cluster (no RAY_ADDRESS, as the
    driver decides), else None: on an existing cluster an actor's share is its `num_cpus` on its node.
    `LISTENER_GRPO_CORES` caps it where several runs share the machine (the test tiers run two at once:
    two runs each threading over every core oversubscribe it, and OpenMP's waiting threads then cost more
    than they compute)."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_ADDRESS"):
        return None
    cores = len(os.sched_getaffinity(0))
    cap = environ.get("LISTENER_GRPO_CORES", "")
    return max(1, min(cores, int(cap))) if cap.isdigit() else cores


def local_cluster_env(environ: Any = None, uses_gpu: bool = False, tcmalloc: str | None = None) -> dict[str, str]:
    """Environment the driver sets before starting a local cluster (the raylet and every actor process inherit
    it). A value the user already set is kept.
    - OpenMP threads that sleep when idle instead of spinning. With `max_staleness` 1 the learner's threads and
      the engines' share the cores, and spinning idle threads took cycles the others needed: mid 34.53 ->
      27.70 s/step with `OMP_WAIT_POLICY=PASSIVE` (BENCHMARKS.md, issue 26).
    - On a CPU-only run, tcmalloc (`tcmalloc`: its path, `tcmalloc_path()`) preloaded into every process, as
      vLLM's CPU backend asks: glibc's malloc cost the engines and the learner 13% of their CPU time, tiny
      0.515 -> 0.454 s/step (BENCHMARKS.md). `LISTENER_GRPO_TCMALLOC=0` leaves it out."""
    environ = os.environ if environ is None else environ
    env = {"OMP_WAIT_POLICY": environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if tcmalloc and not uses_gpu and environ.get("LISTENER_GRPO_TCMALLOC", "1") != "0":
        env["LD_PRELOAD"] = with_preloaded(environ.get("LD_PRELOAD", ""), tcmalloc)
    return env


# Where Debian/Ubuntu (`libtcmalloc-minimal4`) and Fedora/RHEL (`gperftools-libs`) install tcmalloc.
TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4")


def tcmalloc_path(candidates: tuple[str, ...] = TCMALLOC_PATHS) -> str | None:
    """The first tcmalloc library present on this machine, or None."""
    return next((path for path in candidates if os.path.isfile(path)), None)


def with_preloaded(ld_preload: str, library: str) -> str:
    """`LD_PRELOAD` with `library` first, unless it already preloads an allocator (the user's choice)."""
    entries = ld_preload.replace(":", " ").split()
    if any("tcmalloc" in entry or "jemalloc" in entry or "mimalloc" in entry for entry in entries):
        return ld_preload
    return ":".join([library, *entries])


def thread_plan(cfg: RunConfig, cores: int | None) -> ThreadPlan:
    """Threads that follow the cores the run has, no setting per machine. The engines (rollout workers and
    listeners) run together, the listeners scoring shards as they are generated: they split the cores. The
    learner takes every core: with `max_staleness` 0 it runs alone; with 1 the engines' threads run beside it
    only while they generate and score, a part of its step (at mid ~20 of ~50 s), and a core kept back for
    them idles for the rest (CPU 63-67% with one learner thread on 2 cores, BENCHMARKS.md), so the OS shares
    the cores while both run. A section's `num_cpus` (its Ray reservation) is a floor; `cores` None (an
    existing cluster) gives each actor its reservation's whole CPUs."""
    from actors.engine import intra_op_threads

    floor = ThreadPlan(intra_op_threads(cfg.rollout.num_cpus), intra_op_threads(cfg.listener.num_cpus),
                       intra_op_threads(cfg.learner.num_cpus))
    if cores is None:
        return floor
    engine_share = cores // (cfg.rollout.num_workers + cfg.listener.num_workers)
    return ThreadPlan(max(floor.rollout, engine_share), max(floor.listener, engine_share),
                      max(floor.learner, cores // cfg.learner.num_ranks))


def create_actors(cfg: RunConfig, reasoner_path: str, listener_path: str) -> Actors:
    """Create every actor with its resources; the engines start in parallel."""
    import ray

    from actors.learner import LearnerGroup
    from actors.listener import ListenerPool
    from actors.reward import RewardAggregator
    from actors.rollout import RolloutWorker

    check_plan(cfg)
    seed = cfg.trainer.seed
    threads = thread_plan(cfg, local_cores())
    mm_kwargs = engine_processor_kwargs(cfg)
    weight_transfer = "nccl" if planned_transport(cfg) == "nccl" else ""  # vLLM's receiver in the engines
    rollout_options = _options(cfg.rollout.num_cpus, cfg.rollout.num_gpus, cfg.rollout.resource)
    rollout = [
        ray.remote(RolloutWorker).options(**rollout_options, max_restarts=-1, max_task_retries=0)
        .remote(reasoner_path, cfg.rollout.engine, seed=seed + index,
                num_threads=threads.rollout, mm_processor_kwargs=mm_kwargs,
                trust_remote_code=cfg.model.trust_remote_code, weight_transfer=weight_transfer)
        for index in range(cfg.rollout.num_workers)
    ]
    on_head = _on_head_node()
    listener_options = _options(cfg.listener.num_cpus, cfg.listener.num_gpus, cfg.listener.resource)
    listener_pool = ray.remote(ListenerPool).options(
        name=LISTENER_POOL_NAME, namespace=RAY_NAMESPACE, num_cpus=0, max_concurrency=64, **on_head,
    ).remote(listener_path, _with_threads(cfg.listener, threads.listener), worker_options=listener_options,
             seed=seed, mm_processor_kwargs=mm_kwargs, trust_remote_code=cfg.model.trust_remote_code)
    reward = ray.remote(RewardAggregator).options(num_cpus=0, **on_head).remote(cfg.reward,
                                                                                 cfg.algo.advantage_scaling)
    learner_group, learner_options = _learner_group(cfg)
    learner = LearnerGroup(
        reasoner_path, _with_threads(cfg.learner, threads.learner), cfg.algo, seed=seed,
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, trust_remote_code=cfg.model.trust_remote_code,
        actor_options=learner_options, processor_kwargs=mm_kwargs)
    actors = Actors(rollout=rollout, listener_pool=listener_pool, reward=reward, learner=learner,
                    learner_group=learner_group)
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


def _with_threads(section: Any, threads: int) -> Any:
    """The section an actor reads its threads from (`intra_op_threads(num_cpus)`), carrying its planned
    threads; Ray's reservation stays the configured `num_cpus` (`_options`)."""
    return section.model_copy(update={"num_cpus": float(threads)})


def _on_head_node() -> dict[str, Any]:
    """Actor options pinning an actor to the head node (nothing if no node carries the head marker)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = head_node_id(ray.nodes())
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)} if head else {}


def _learner_group(cfg: RunConfig) -> tuple[Any, dict[str, Any]]:
    """The learner ranks' placement group, ready (or one line after trainer.startup_timeout_s), and the
    ranks' actor options (each rank takes one bundle)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    learner = cfg.learner
    options = _options(learner.num_cpus, learner.num_gpus, learner.resource)
    spec = learner_placement_group(cfg)
    if spec is None:
        return None, options
    bundles, strategy = spec
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=cfg.trainer.startup_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ConfigError(f"the learner's placement group ({len(bundles)} x {bundles[0]}, {strategy}) was not "
                          f"placed within {cfg.trainer.startup_timeout_s:g} s (trainer.startup_timeout_s): no node "
                          f"holds all the ranks; set learner.placement=pack or fewer learner.num_ranks") from None
    return group, {**options, "scheduling_strategy": PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=-1, placement_group_capture_child_tasks=False)}
