"""The collective transport's process group: learner rank 0 (rank 0) and the rollout workers' processes
(ranks 1..R) over a TCPStore of their own, so it never touches the learners' default group; gloo on CPU,
NCCL on GPU with a watchdog of `NCCL_GROUP_TIMEOUT`."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from actors.weight_buckets import NamedTensors, unpack_bucket
from pipeline.types import WeightBucketMeta

_GROUP_TIMEOUT = timedelta(minutes=10)  # gloo and the TCPStore: a dead CPU peer is detected by its socket
# NCCL: a broadcast may wait behind a long `generate` (max_staleness 1) or a slow gather; NCCL's default
# 10-minute watchdog would kill the learner for it.
NCCL_GROUP_TIMEOUT = timedelta(hours=2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


@dataclass
class WeightGroup:
    """A process group with the TCPStore it was built on (the store must outlive the group)."""

    process_group: Any
    store: Any
    device: torch.device


def new_group(host: str, port: int, rank: int, world_size: int, backend: str) -> WeightGroup:
    """A process group over its own TCPStore (rank 0 hosts the store); independent of any default group."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=_GROUP_TIMEOUT,
                          wait_for_workers=False)
    prefixed = dist.PrefixStore("weight_sync", store)
    if backend == "gloo":
        process_group = dist.ProcessGroupGloo(prefixed, rank, world_size, _GROUP_TIMEOUT)
        device = torch.device("cpu")
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = NCCL_GROUP_TIMEOUT  # the watchdog's limit: see NCCL_GROUP_TIMEOUT
        process_group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise ValueError(f"unknown backend {backend!r}; expected 'gloo' or 'nccl'")
    group = WeightGroup(process_group=process_group, store=store, device=device)
    broadcast(group, torch.zeros(1, dtype=torch.uint8, device=device))  # every member has joined
    return group


def broadcast(group: WeightGroup, buffer: torch.Tensor) -> None:
    """Broadcast `buffer` in place from group rank 0."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.process_group.broadcast([buffer], options).wait()


class CollectiveReceiver:
    """Rollout-worker side of the collective transport: joins the group, receives buckets."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self.group = new_group(host, port, rank, world_size, backend)

    def receive(self, meta: WeightBucketMeta) -> NamedTensors:
        buffer = torch.empty(meta.num_bytes, dtype=torch.uint8, device=self.group.device)
        broadcast(self.group, buffer)
        return unpack_bucket(meta, buffer)
