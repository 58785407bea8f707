"""GPU checks of the weight sync (CUDA only; skipped without it), issue 25:

- one GPU: a CUDA bucket through the object store's path (`byte_view` hops it to pinned host memory, never
  `.numpy()` on the device) comes back bit for bit;
- two GPUs, Ray and vLLM: `sync.transport=nccl` (vLLM's weight-transfer engine, actors/weight_sync_nccl.py)
  from this process's GPU to a real `RolloutWorker` on the other GPU: perturbed weights change the engine's
  greedy tokens, and syncing the checkpoint's own weights back restores them exactly.

    python -m pytest -m gpu tests/gpu/test_gpu_weight_transfer.py -s
"""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_cuda_bucket_crosses_the_object_store_path_through_pinned_memory() -> None:
    from actors.weight_buckets import bucket_meta, byte_view, from_byte_arrays

    named = [("a.weight", torch.randn(1024, 1024, device="cuda")),
             ("b.weight", torch.randn(4096, device="cuda").to(torch.bfloat16)),
             ("c.weight", torch.randn(64, 32, device="cuda").t())]  # not contiguous
    arrays = [byte_view(tensor) for _, tensor in named]
    back = from_byte_arrays(bucket_meta(named), arrays)
    assert all(torch.equal(got, want.cpu()) for (_, got), (_, want) in zip(back, named))


def _gpu_id(_actor) -> int:
    import ray

    return int(ray.get_gpu_ids()[0])


def _greedy(ray, worker, pairs) -> list[list[int]]:
    groups = ray.get(worker.generate.remote(pairs, 1, 12, 0.0, 1.0))
    return [group.completions[0].token_ids.tolist() for group in groups]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_nccl_transport_reaches_a_vllm_engine(ray_local, tiny_reasoner_dir) -> None:
    from transformers import AutoModelForImageTextToText

    from actors.rollout import RolloutWorker
    from actors.weight_sync import make_transport, resolve_transport, sync_weights
    from pipeline.config import EngineConfig
    from pipeline.synthetic import synthetic_pairs

    worker = ray_local.remote(RolloutWorker).options(num_gpus=1, resources={"rollout": 1}).remote(
        str(tiny_reasoner_dir), EngineConfig(dtype="float32", gpu_memory_utilization=0.3), seed=0,
        weight_transfer="nccl")
    engine_gpu = ray_local.get(worker.__ray_call__.remote(_gpu_id))
    torch.cuda.set_device(next(i for i in range(torch.cuda.device_count()) if i != engine_gpu))
    model = AutoModelForImageTextToText.from_pretrained(tiny_reasoner_dir, dtype=torch.float32).cuda()
    for name, param in model.named_parameters():
        param.requires_grad_("visual" not in name)  # as the learner: the frozen tower is not synced
    pairs = list(synthetic_pairs(seed=5, count=3))
    try:
        assert resolve_transport("auto", [worker]) == "nccl"
        before = _greedy(ray_local, worker, pairs)
        transport = make_transport("nccl", [worker])
        original = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.5)
        start = time.perf_counter()
        report = sync_weights(model, transport, 1, 2**20, "nccl")
        print(f"\nnccl sync, tiny model: {report.num_bytes / 2**20:.1f} MiB in {report.num_buckets} buckets, "
              f"{time.perf_counter() - start:.3f} s")
        assert not report.error and report.num_buckets > 1
        changed = _greedy(ray_local, worker, pairs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in original:
                    p.copy_(original[name])
        assert not sync_weights(model, transport, 2, 2**20, "nccl").error
        restored = _greedy(ray_local, worker, pairs)
        transport.close()
    finally:
        ray_local.kill(worker)
    assert changed != before and restored == before
