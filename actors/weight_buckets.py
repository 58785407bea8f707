"""A weight bucket as bytes: tensors packed back to back (16-byte aligned) in one uint8 buffer, described by a
`WeightBucketMeta` (names, dtypes, shapes, size), and read back as views without a copy. The one layout every
transport of actors/weight_sync.py sends (never pickled tensors: pickling a ZeRO-3 view pickles its storage)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.types import WeightBucketMeta

NamedTensors = list[tuple[str, torch.Tensor]]


def byte_view(tensor: torch.Tensor) -> Any:
    """The tensor's own bytes as a numpy uint8 array: sharing its memory for a host tensor (copied only if
    not contiguous); for a CUDA tensor, a copy in pinned host memory (`host_bytes`: numpy has no view of
    device memory, and the object store holds host bytes)."""
    flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
    return (host_bytes(flat) if flat.device.type != "cpu" else flat).numpy()


def host_bytes(flat_u8: torch.Tensor, pin: bool | None = None) -> torch.Tensor:
    """A host copy of a flat uint8 tensor, in pinned (page-locked) memory where CUDA is there to pin it, so
    the device-to-host copy runs at full PCIe speed; synchronised before it is returned."""
    pin = torch.cuda.is_available() if pin is None else pin
    host = torch.empty(flat_u8.numel(), dtype=torch.uint8, pin_memory=pin)
    host.copy_(flat_u8, non_blocking=pin)
    if pin and flat_u8.device.type == "cuda":
        torch.cuda.current_stream(flat_u8.device).synchronize()
    return host


def from_byte_arrays(meta: WeightBucketMeta, arrays: Sequence[Any]) -> NamedTensors:
    """Worker side of `ObjectStoreTransport`: the bucket's tensors as views of the (read-only) arrays."""
    return [(name, byte_tensor(array).view(getattr(torch, dtype)).view(shape))
            for name, dtype, shape, array in zip(meta.names, meta.dtypes, meta.shapes, arrays, strict=True)]


def read_shared_bucket(path: str, meta: WeightBucketMeta) -> NamedTensors:
    """Worker side of `SharedMemoryTransport`: views of the bucket in a private mapping of `path`."""
    return unpack_bucket(meta, torch.from_file(path, shared=False, size=meta.num_bytes, dtype=torch.uint8))


def byte_tensor(buffer: Any) -> torch.Tensor:
    """A uint8 tensor over `buffer` (e.g. a read-only numpy array from the object store), not copied."""
    if isinstance(buffer, torch.Tensor):
        return buffer
    with warnings.catch_warnings():  # read-only: the engine only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(buffer)


_ALIGN = 16  # every tensor starts at a multiple of 16 bytes, so any dtype can be viewed in place


def bucket_layout(nbytes: Sequence[int]) -> tuple[list[int], int]:
    """Byte offsets of tensors of `nbytes` packed back to back with alignment, and the total size."""
    offsets, end = [], 0
    for size in nbytes:
        start = -(-end // _ALIGN) * _ALIGN
        offsets.append(start)
        end = start + size
    return offsets, end


def bucket_meta(named: NamedTensors) -> WeightBucketMeta:
    """Names, dtypes, shapes and packed size of a bucket."""
    _, total = bucket_layout([t.numel() * t.element_size() for _, t in named])
    return WeightBucketMeta(names=tuple(name for name, _ in named),
                            dtypes=tuple(str(t.dtype).removeprefix("torch.") for _, t in named),
                            shapes=tuple(tuple(t.shape) for _, t in named), num_bytes=total)


def write_bucket(named: NamedTensors, buffer: torch.Tensor) -> None:
    """Copy every tensor of the bucket to its offset in the byte `buffer` (the layout of `bucket_layout`)."""
    sizes = [t.numel() * t.element_size() for _, t in named]
    offsets, _ = bucket_layout(sizes)
    for (_, tensor), start, size in zip(named, offsets, sizes):
        buffer[start:start + size].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))


def pack_bucket(named: NamedTensors, device: torch.device) -> tuple[WeightBucketMeta, torch.Tensor]:
    """One contiguous byte buffer holding every tensor of the bucket (one broadcast / put per bucket)."""
    meta = bucket_meta(named)
    buffer = torch.empty(meta.num_bytes, dtype=torch.uint8, device=device)
    write_bucket(named, buffer)
    return meta, buffer


def unpack_bucket(meta: WeightBucketMeta, buffer: torch.Tensor) -> NamedTensors:
    """Views into `buffer` with the bucket's names, dtypes and shapes."""
    dtypes = [getattr(torch, name) for name in meta.dtypes]
    sizes = [torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
             for shape, dtype in zip(meta.shapes, dtypes)]
    offsets, _ = bucket_layout(sizes)
    return [(name, buffer[start:start + size].view(dtype).view(shape))
            for name, dtype, shape, start, size in zip(meta.names, dtypes, meta.shapes, offsets, sizes)]
