"""Weight sync: gather the learner's parameters (ZeRO-3 partitions, or whole tensors at stages 0/2) bucket
by bucket and send each bucket to every rollout worker.

Learner side (`sync_weights`, run by EVERY learner rank, since gathering a ZeRO-3 parameter is a
collective): parameters are planned into buckets of at most `bucket_mb` MiB by `p.ds_numel` (the full
size; `p.numel()` is 0 for a partitioned parameter), cut only between layers (`layer_key`: q/k/v, gate/up
travel together, so the engine completes every fused layer within the bucket), each bucket is gathered with
`deepspeed.zero.GatheredParameters`, rank 0 hands it to the transport, and the bucket is released before
the next is gathered, so no rank ever holds more than one bucket of gathered parameters beyond the
persistent ones. Frozen parameters are skipped (the rollout engines loaded them with the checkpoint).
Names are mapped from the transformers module names to the checkpoint names of `model.safetensors`
(`model.language_model.*` -> `model.*` for Qwen2.5-VL), which vLLM's loader maps to its own.

Transports (`SyncConfig.transport`), one interface (`WeightTransport`); a bucket travels as raw bytes with a
`WeightBucketMeta` (names, dtypes, shapes; actors/weight_buckets.py), never as pickled tensors (a ZeRO-3
parameter on one rank is a view of one flat buffer, and pickling a view pickles its whole storage: that made a
97 MB sync serialise ~9 GB and take 40+ s):
- `shared_memory` (same node; what `auto` picks when every worker shares learner rank 0's node): rank 0
  copies the bucket into a staging file in /dev/shm; the workers map it and the engine loads from views.
  One copy into staging, one into the engine, nothing serialised.
- `object_store`: rank 0 `ray.put`s the bucket once (a numpy byte view per tensor); workers read it in place.
  A CUDA bucket first hops to pinned host memory (`host_bytes`): the object store holds host bytes only.
- `collective`: a process group of learner rank 0 (rank 0) and the rollout workers' processes (ranks
  1..R), built from its own TCPStore, so it never touches the learners' default group; each packed bucket
  is broadcast (gloo on CPU, NCCL on GPU, with a watchdog of `NCCL_GROUP_TIMEOUT`, not NCCL's 10 minutes);
  the workers get the meta through Ray (`CollectiveReceiver`, in the Ray actor's process); the group is
  actors/weight_group.py.
- `nccl` (what `auto` picks when the learner and the engines are on GPUs, `plan_transport`): vLLM's own
  weight-transfer engine, the receiver in each vLLM worker; actors/weight_sync_nccl.py.
- `cuda_ipc` (planned): a learner and an engine sharing a GPU would send CUDA IPC handles of the gathered
  bucket (`torch.multiprocessing.reductions.reduce_tensor`) instead of bytes; add a class with the same
  three methods and register it in `TRANSPORTS`.
After the last bucket every worker gets `finish_weight_update(version)`. A failed send on workers that are
all alive in the processes the transport was built with is reported as `SYNC_FAILED` (the driver stops
with it); anything else (a worker gone or restarted) as a failure the driver recovers from by a restart.

Every rank must call `sync_weights` (and its gathers) in the same order; if rank 0's transport fails
mid-sync the other ranks wait in the next gather until the group's timeout, so treat a failed sync as
fatal for the learner group. Tests: `pytest -m integration tests/integration/test_weight_sync.py`;
benchmark: `python -m bench.weight_sync`.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

from actors.weight_buckets import NamedTensors, bucket_meta, byte_view, pack_bucket, write_bucket
from actors.weight_group import broadcast, free_port, new_group
from pipeline.types import WeightVersion

SYNC_FAILED = "weight sync failed with every rollout worker alive"


# ---- learner side: planning and gathering -------------------------------------------------------------

def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Module parameter name -> checkpoint (model.safetensors) name, via transformers' own save mapping."""
    from transformers.core_model_loading import revert_weight_conversion

    names = [name for name, _ in model.named_parameters()]
    tagged = {name: torch.tensor([i]) for i, name in enumerate(names)}
    try:
        reverted = revert_weight_conversion(model, tagged)
    except Exception:  # a model without conversion rules saves its module names as they are
        return {name: name for name in names}
    return {names[int(tensor[0])]: saved for saved, tensor in reverted.items()}


def full_bytes(param: torch.nn.Parameter) -> int:
    """Bytes of the whole parameter, partitioned (ZeRO-3: ds_numel) or not."""
    numel = getattr(param, "ds_numel", None)
    return (param.numel() if numel is None else numel) * param.element_size()


def layer_key(name: str) -> str:
    """The module a parameter's engine layer is fused within: its grandparent (`...self_attn` holds q/k/v,
    `...mlp` gate/up), or its parent for a two-part name. Buckets are only cut between two of these."""
    parts = name.split(".")
    return ".".join(parts[:-2] if len(parts) > 2 else parts[:-1])


def plan_buckets(model: torch.nn.Module, bucket_bytes: int, include_frozen: bool = False
                 ) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Parameters in module order, cut into buckets of at most `bucket_bytes`, never inside a `layer_key`
    group (a group bigger than that goes alone). An engine layer fused from several parameters (q/k/v ->
    qkv_proj) then arrives whole in one bucket, so the engine never holds a bucket past its load."""
    groups: list[list[tuple[str, torch.nn.Parameter]]] = []
    for name, param in model.named_parameters():
        if not (param.requires_grad or include_frozen):
            continue
        if groups and layer_key(groups[-1][-1][0]) == layer_key(name):
            groups[-1].append((name, param))
        else:
            groups.append([(name, param)])
    buckets: list[list[tuple[str, torch.nn.Parameter]]] = [[]]
    size = 0
    for group in groups:
        nbytes = sum(full_bytes(param) for _, param in group)
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].extend(group)
        size += nbytes
    return [bucket for bucket in buckets if bucket]


def gathered_bytes(model: torch.nn.Module) -> int:
    """Measured: bytes of non-persistent ZeRO-3 parameters whose full tensor is materialised right now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(full_bytes(p) for p in model.parameters()
               if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE and not getattr(p, "ds_persist", False))


@contextmanager
def gathered(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """All ranks: materialise `params` in full for reading (a no-op for a model not under ZeRO-3)."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


def iter_gathered_buckets(model: torch.nn.Module, bucket_bytes: int, include_frozen: bool = False,
                          stats: dict[str, int] | None = None) -> Iterator[NamedTensors]:
    """All ranks: yield each bucket gathered, as (checkpoint name, full tensor) pairs valid until the next.

    `stats["peak_gathered_bytes"]` records the measured peak of gathered parameters while a bucket is held.
    """
    names = checkpoint_names(model)
    for bucket in plan_buckets(model, bucket_bytes, include_frozen):
        with gathered([p for _, p in bucket]):
            if stats is not None:
                stats["peak_gathered_bytes"] = max(stats.get("peak_gathered_bytes", 0), gathered_bytes(model))
            yield [(names[name], p.data) for name, p in bucket]


def sync_weights(model: torch.nn.Module, transport: "WeightTransport | None", version: int,
                 bucket_bytes: int, transport_name: str = "") -> WeightVersion | None:
    """All learner ranks call this; rank 0 passes its transport, the others None. Rank 0 returns the report.

    Phases (seconds summed over buckets): gather = materialising each bucket (and releasing the previous);
    load = the slowest worker's engine load of each bucket, plus closing the update; transfer = the rest
    of each send (packing, staging, the transport, the calls).
    """
    start = time.perf_counter()
    stats: dict[str, int] = {}
    phases = {"gather_s": 0.0, "transfer_s": 0.0, "load_s": 0.0}
    num_bytes = num_buckets = 0
    error = ""
    buckets = iter_gathered_buckets(model, bucket_bytes, stats=stats)
    while True:
        t_gather = time.perf_counter()
        named = next(buckets, None)
        phases["gather_s"] += time.perf_counter() - t_gather
        if named is None:
            break
        if transport is not None and not error:
            t_send = time.perf_counter()
            try:
                load_s = transport.send_bucket(named)
            except Exception as exc:  # report it, but keep gathering in step with the other ranks (they
                error, load_s = describe_failure(transport, exc), 0.0  # would wait for rank 0)
            phases["load_s"] += load_s
            phases["transfer_s"] += time.perf_counter() - t_send - load_s
        num_bytes += sum(t.numel() * t.element_size() for _, t in named)
        num_buckets += 1
    if transport is None:
        return None
    if not error:
        t_finish = time.perf_counter()
        try:
            transport.finish(version)
        except Exception as exc:
            error = describe_failure(transport, exc)
        phases["load_s"] += time.perf_counter() - t_finish
    return WeightVersion(version=version, num_bytes=num_bytes, num_buckets=num_buckets,
                         seconds=time.perf_counter() - start, transport=transport_name,
                         peak_gathered_bytes=stats.get("peak_gathered_bytes", 0), error=error, **phases)


def _describe(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()  # a RayTaskError's last line is the remote error itself
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def describe_failure(transport: Any, exc: Exception, timeout_s: float = 60.0) -> str:
    """The error of a failed send: prefixed with `SYNC_FAILED` when every worker still answers from the
    process the transport was built with (the sync itself failed: restarting workers would not help);
    plain otherwise (a worker died or restarted, or does not answer: the driver's recovery applies)."""
    baseline = getattr(transport, "pids", None)
    if baseline is not None and same_processes(getattr(transport, "workers", []), baseline, timeout_s):
        return f"{SYNC_FAILED} ({_describe(exc)})"
    return _describe(exc)


def worker_pids(workers: Sequence[Any], timeout_s: float | None = None) -> list[int] | None:
    """Each worker's process id (waiting behind its current call), or None if any is dead or does not answer."""
    import ray

    try:
        return [int(pid) for pid in ray.get([w.__ray_call__.remote(_pid) for w in workers], timeout=timeout_s)]
    except Exception:  # RayActorError, GetTimeoutError, ...: not provably the same live processes
        return None


def same_processes(workers: Sequence[Any], pids: Sequence[int], timeout_s: float) -> bool:
    """Whether every worker answers within `timeout_s` from process `pids[i]`; False as soon as one does
    not (a restarted worker answers with a new pid; a survivor stuck in a collective is not waited for)."""
    import ray

    refs = {worker.__ray_call__.remote(_pid): pid for worker, pid in zip(workers, pids, strict=True)}
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            return False
        try:
            if int(ray.get(done[0])) != refs[done[0]]:
                return False
        except Exception:
            return False
    return True


def _pid(_actor: Any) -> int:
    return os.getpid()


# ---- transports -------------------------------------------------------------------------------------

class WeightTransport(Protocol):
    """How rank 0 delivers buckets to the rollout workers."""

    def send_bucket(self, named: NamedTensors) -> float:
        """Deliver one bucket to every worker; returns the slowest worker's engine-load seconds."""

    def finish(self, version: int) -> None: ...

    def close(self) -> None: ...


def _finish_all(workers: Sequence[Any], version: int) -> None:
    import ray

    ray.get([worker.finish_weight_update.remote(version) for worker in workers])


class ObjectStoreTransport:
    """Each bucket goes into the Ray object store once, as one numpy byte view per tensor (copied straight
    into the store, no intermediate buffer); every worker reads the arrays in place and loads views."""

    def __init__(self, workers: Sequence[Any]) -> None:
        self.workers = list(workers)

    def send_bucket(self, named: NamedTensors) -> float:
        import ray

        # Numpy views, never tensors: a tensor that is a view (ZeRO-3 on one rank keeps every parameter in
        # one flat buffer) pickles its WHOLE storage, once per tensor; a numpy view carries only its bytes.
        ref = ray.put([byte_view(tensor) for _, tensor in named])
        meta = bucket_meta(named)
        return max(ray.get([worker.load_bucket_arrays.remote(meta, ref) for worker in self.workers]))

    def finish(self, version: int) -> None:
        _finish_all(self.workers, version)

    def close(self) -> None:
        self.workers = []


class SharedMemoryTransport:
    """Same node only: rank 0 writes each bucket into a staging file in /dev/shm (one copy, no
    serialisation); every worker maps it and the engine loads straight from views of the mapping.

    One staging file is reused bucket after bucket; a worker whose engine still holds views into it
    after a bucket (vLLM buffers a fused layer until all its parts arrived) says so, and the next bucket
    goes to a new file (the old one lives on, unlinked, until the engine lets go). The file is unlinked
    at the end of every sync, so a learner that dies leaves at most one bucket behind in /dev/shm.
    """

    def __init__(self, workers: Sequence[Any], directory: str = "/dev/shm") -> None:
        self.workers = list(workers)
        self.directory = directory if os.path.isdir(directory) else tempfile.gettempdir()
        self.prefix = f"lgrpo-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._files = 0
        self._path = ""
        self._staging: torch.Tensor | None = None

    def _stage(self, num_bytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < num_bytes:
            self._release()
            self._path = os.path.join(self.directory, f"{self.prefix}-{self._files}")
            self._files += 1
            with open(self._path, "wb") as file:
                file.truncate(num_bytes)
            self._staging = torch.from_file(self._path, shared=True, size=num_bytes, dtype=torch.uint8)
        return self._staging

    def send_bucket(self, named: NamedTensors) -> float:
        import ray

        meta = bucket_meta(named)
        write_bucket(named, self._stage(meta.num_bytes))
        results = ray.get([worker.load_shared_bucket.remote(self._path, meta) for worker in self.workers])
        if any(pinned for _, pinned in results):
            self._release()  # never overwrite bytes an engine still refers to
        return max(seconds for seconds, _ in results)

    def _release(self) -> None:
        self._staging = None
        path, self._path = getattr(self, "_path", ""), ""  # getattr: __del__ after a failed __init__
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def finish(self, version: int) -> None:
        self._release()
        _finish_all(self.workers, version)

    def close(self) -> None:
        self._release()
        self.workers = []

    def __del__(self) -> None:
        self._release()


class CollectiveTransport:
    """Broadcast over a process group of learner rank 0 and the rollout workers (their own TCPStore)."""

    def __init__(self, workers: Sequence[Any], device: torch.device | None = None) -> None:
        import ray

        self.workers = list(workers)
        self.device = device or (torch.device("cuda", torch.cuda.current_device())
                                 if torch.cuda.is_available() else torch.device("cpu"))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        host = "127.0.0.1" if same_node(self.workers) else ray.util.get_node_ip_address()
        port = free_port()
        world_size = len(self.workers) + 1
        joins = [worker.init_weight_group.remote(host, port, rank, world_size, backend)
                 for rank, worker in enumerate(self.workers, start=1)]
        self.group = new_group(host, port, 0, world_size, backend)  # returns once every worker has joined
        ray.get(joins)

    def send_bucket(self, named: NamedTensors) -> float:
        import ray

        meta, buffer = pack_bucket(named, self.device)
        receives = [worker.receive_weight_bucket.remote(meta) for worker in self.workers]
        broadcast(self.group, buffer)
        return max(ray.get(receives))

    def finish(self, version: int) -> None:
        _finish_all(self.workers, version)

    def close(self) -> None:
        self.group = None


# The transports that run everywhere (CPU and GPU); `nccl` needs CUDA on both ends.
TRANSPORTS = {"object_store": ObjectStoreTransport, "collective": CollectiveTransport,
              "shared_memory": SharedMemoryTransport}
GPU_TRANSPORTS = ("nccl",)  # actors/weight_sync_nccl.py


def plan_transport(name: str, learner_on_gpu: bool, rollout_on_gpu: bool, same_node: bool | None) -> str:
    """What `sync.transport` stands for (pure; `same_node` None: not known yet). `auto`: vLLM's NCCL
    engine when the learner and the engines are on GPUs (never a host hop of every bucket); else shared
    memory when every worker is on learner rank 0's node, else the object store (CUDA buckets hop through
    pinned host memory). Without `same_node`, the CPU choice stays `auto` (decided when the sync starts)."""
    if name != "auto":
        return name
    if learner_on_gpu and rollout_on_gpu:
        return "nccl"
    if same_node is None:
        return "auto"
    return "shared_memory" if same_node else "object_store"


def resolve_transport(name: str, workers: Sequence[Any]) -> str:
    """`plan_transport` with what learner rank 0 sees: its own GPU, the workers' GPUs and nodes."""
    if name != "auto":
        return name
    import ray

    learner_on_gpu = torch.cuda.is_available()
    rollout_on_gpu = learner_on_gpu and all(ray.get([w.__ray_call__.remote(_has_cuda) for w in workers]))
    return plan_transport(name, learner_on_gpu, rollout_on_gpu, same_node(workers))


def _has_cuda(_actor: Any) -> bool:
    return torch.cuda.is_available()


def make_transport(name: str, workers: Sequence[Any]) -> WeightTransport:
    if name in GPU_TRANSPORTS:
        from actors.weight_sync_nccl import NcclTransport as cls
    elif name in TRANSPORTS:
        cls = TRANSPORTS[name]
    else:
        raise ValueError(f"unknown weight-sync transport {name!r}; known: {sorted([*TRANSPORTS, *GPU_TRANSPORTS])}")
    transport = cls(workers)
    transport.pids = worker_pids(workers)  # describe_failure: the same live processes after a failed send?
    return transport



def same_node(workers: Sequence[Any]) -> bool:
    """Whether every worker runs on this process's node."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return all(node == here for node in ray.get([worker.__ray_call__.remote(_node_id) for worker in workers]))


def _node_id(_actor: Any) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


