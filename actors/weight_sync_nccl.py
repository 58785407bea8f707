"""The `nccl` weight-sync transport: vLLM 0.32's own weight-transfer engine between learner rank 0's GPU and
the rollout engines' GPUs (`vllm/distributed/weight_transfer/nccl_engine.py`, `nccl_common.py`,
`packed_tensor.py`). What `sync.transport: auto` picks when the learner and the engines are on GPUs.

- The rollout engines are built with `weight_transfer_config={"backend": "nccl"}` (placement passes
  `weight_transfer="nccl"` to `RolloutWorker`), so every vLLM worker holds vLLM's `NCCLWeightTransferEngine`:
  the receiver lives in each vLLM worker (each tensor-parallel rank), not in the Ray actor.
- Rendezvous: vLLM's `StatelessProcessGroup` (its own TCPStore, hosted by learner rank 0) and a
  `PyNcclCommunicator`; never the learners' default group. Learner rank 0 is NCCL rank 0, engine i's worker
  of TP rank t is `1 + i * tensor_parallel_size + t` (`nccl_worker_init_info`). pynccl has no watchdog;
  rank 0 waits up to `NCCL_GROUP_TIMEOUT` for every engine to join.
- Per bucket of `actors.weight_sync.sync_weights`: each worker runs vLLM's `update_weights` (the packed,
  double-buffered consumer, loading through the layer-wise reload session vLLM's `start_weight_update`
  opened) while rank 0 runs vLLM's packed producer; `finish_weight_update` closes vLLM's session.

Where it departs from vLLM's `NCCLTrainerWeightTransferEngine.send_weights`: one `update_weights` per bucket
(the ZeRO-3 gather of a bucket is a collective of every learner rank and the bucket is released before the
next), not one per model; chunks of `PACKED_CHUNK_BYTES` keep two broadcasts in flight within a bucket.
Needs CUDA on both ends and one GPU per rank (NCCL refuses two ranks on one GPU); the GPU test is
tests/gpu/test_gpu_weight_transfer.py (two GPUs). The pure parts are tested in tests/unit/test_gpu_plan.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from actors.weight_buckets import NamedTensors, bucket_meta
from actors.weight_group import NCCL_GROUP_TIMEOUT, free_port
from actors.weight_sync import _finish_all, same_node
from pipeline.types import WeightBucketMeta

PACKED_CHUNK_BYTES = 256 * 2**20  # vLLM's packed producer/consumer chunk: two in flight per bucket


class NcclTransport:
    """vLLM's weight-transfer engine over NCCL (see the module docstring): every rollout engine's vLLM
    workers join one stateless NCCL group with learner rank 0; per bucket the workers receive in vLLM's
    `update_weights` while rank 0 broadcasts with vLLM's packed producer."""

    def __init__(self, workers: Sequence[Any], tensor_parallel_size: int = 1) -> None:
        import ray

        self.workers = list(workers)
        host = "127.0.0.1" if same_node(self.workers) else ray.util.get_node_ip_address()
        port = free_port()
        infos = [nccl_worker_init_info(host, port, index, len(self.workers), tensor_parallel_size)
                 for index in range(len(self.workers))]
        joins = [worker.init_weight_transfer.remote(info) for worker, info in zip(self.workers, infos)]
        pool = ThreadPoolExecutor(max_workers=1)  # rank 0 waits in the rendezvous while the workers join
        future = pool.submit(trainer_nccl_group, host, port, infos[0]["world_size"])
        try:
            ray.get(joins)  # a worker that cannot join raises here instead of leaving rank 0 waiting
            self.group = future.result()
        finally:
            pool.shutdown(wait=False)

    def send_bucket(self, named: NamedTensors) -> float:
        import ray
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        receives = [worker.receive_weight_transfer.remote(transfer_update_info(bucket_meta(named)))
                    for worker in self.workers]
        done, _ = ray.wait(receives, num_returns=len(receives), timeout=0)
        ray.get(done)  # a worker that refused the update already: never broadcast into a missing peer
        packed_nccl_broadcast_producer(iter(named), self.group, src=0, post_iter_func=lambda item: item[1],
                                       buffer_size_bytes=PACKED_CHUNK_BYTES, num_buffers=2)
        return max(ray.get(receives))

    def finish(self, version: int) -> None:
        _finish_all(self.workers, version)

    def close(self) -> None:
        group, self.group = getattr(self, "group", None), None
        if group is not None:
            group.destroy()
        self.workers = []


def nccl_worker_init_info(host: str, port: int, index: int, num_engines: int,
                          tensor_parallel_size: int = 1) -> dict[str, Any]:
    """vLLM's `NCCLWeightTransferInitInfo` (as the dict `init_weight_transfer_engine` takes) for rollout
    engine `index`: learner rank 0 is NCCL rank 0; engine i's vLLM worker of TP rank t is rank
    `rank_offset + t` with `rank_offset = 1 + i * tensor_parallel_size` (vLLM adds the worker's own rank)."""
    return {"master_address": host, "master_port": port, "rank_offset": 1 + index * tensor_parallel_size,
            "world_size": 1 + num_engines * tensor_parallel_size, "packed": True,
            "packed_buffer_size_bytes": PACKED_CHUNK_BYTES, "packed_num_buffers": 2}


def transfer_update_info(meta: WeightBucketMeta) -> dict[str, Any]:
    """vLLM's `NCCLWeightTransferUpdateInfo` for one bucket (as the dict `update_weights` takes)."""
    return {"names": list(meta.names), "dtype_names": list(meta.dtypes), "shapes": [list(s) for s in meta.shapes]}


def trainer_nccl_group(host: str, port: int, world_size: int) -> Any:
    """Learner rank 0's end of the group: vLLM's stateless group (its own TCPStore, hosted here, waiting
    `NCCL_GROUP_TIMEOUT` for every engine to join) and a `PyNcclCommunicator` on this process's GPU."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.utils.nccl import unpinned_nccl_env

    store = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world_size,
                                         store_timeout=int(NCCL_GROUP_TIMEOUT.total_seconds()))
    with unpinned_nccl_env():
        return PyNcclCommunicator(store, device=torch.cuda.current_device())
