"""GPU checks (CUDA only; skipped without it): a DeepSpeed ZeRO-3 learner step over NCCL, and the
collective weight transport's NCCL broadcast between two processes.

Neither needs Ray or vLLM, so both run standalone on a 1-GPU machine:
    python -m pytest -m gpu tests/gpu -s
The broadcast needs one GPU per process (NCCL refuses two ranks of one communicator on the same GPU; a
learner and an engine sharing a GPU is the planned CUDA IPC transport), so it is skipped on one GPU.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batch(model_dir, pairs: int = 4, group: int = 4):
    from transformers import AutoProcessor

    from pipeline.prompts import format_target, reasoner_prompt
    from pipeline.synthetic import synthetic_pairs
    from pipeline.types import TrainBatch, TrainSequence

    processor = AutoProcessor.from_pretrained(model_dir)
    sequences = []
    for pair in synthetic_pairs(seed=0, count=pairs):
        enc = processor(text=[reasoner_prompt(pair.prompt)], images=[pair.image_1, pair.image_2], return_tensors="np")
        for g in range(group):
            ids = processor.tokenizer(format_target(f"the {pair.prompt}", 1 + g % 2), add_special_tokens=False)
            completion = np.asarray(ids["input_ids"], dtype=np.int64)
            sequences.append(TrainSequence(
                pair_id=pair.pair_id, completion_index=g, prompt_token_ids=enc["input_ids"][0].astype(np.int64),
                completion_token_ids=completion, rollout_logprobs=np.full(len(completion), -7.0, np.float32),
                advantage=1.0 if g % 2 == 0 else -1.0, images=(pair.image_1, pair.image_2)))
    return TrainBatch(step=1, policy_version=0, sequences=tuple(sequences))


def test_learner_step_over_nccl(tiny_reasoner_dir) -> None:
    from actors.learner import LearnerRank
    from actors.weight_group import free_port
    from pipeline.config import AlgoConfig, LearnerConfig

    rank = LearnerRank(str(tiny_reasoner_dir), LearnerConfig(num_ranks=1, lr=1e-4, dtype="bfloat16",
                                                             micro_batch_tokens=512, num_gpus=1),
                       AlgoConfig(kl_coef=0.05), rank=0, world_size=1, max_new_tokens=64)
    rank.setup("127.0.0.1", free_port())
    assert torch.distributed.get_backend() == "nccl"
    batch = _batch(tiny_reasoner_dir)
    before = rank.gathered_state_dict(include_frozen=False)
    first = rank.train_step(batch)
    start = time.perf_counter()
    second = rank.train_step(batch)
    seconds = time.perf_counter() - start
    after = rank.gathered_state_dict(include_frozen=False)
    print(f"\nGPU learner step (tiny, bf16, 1 rank, ZeRO-3/NCCL): {seconds:.3f} s, "
          f"{second.values['tokens_per_s']:.0f} tokens/s, loss {first.values['loss']:.4f} -> "
          f"{second.values['loss']:.4f}, grad_norm {first.values['grad_norm']:.3f}")
    assert np.isfinite(first.values["loss"]) and first.values["grad_norm"] > 0
    assert "kl" in first.values  # the reference model ran
    assert any(not np.array_equal(before[k], after[k]) for k in before)


def _broadcast_worker(rank: int, port: int, nbytes: int, queue) -> None:
    from actors.weight_buckets import pack_bucket
    from actors.weight_group import CollectiveReceiver, broadcast, new_group

    torch.cuda.set_device(rank % torch.cuda.device_count())
    generator = torch.Generator().manual_seed(0)
    named = [("a.weight", torch.randn(nbytes // 4, generator=generator).cuda()),
             ("b.bias", torch.randn(1000, generator=generator).to(torch.bfloat16).cuda())]
    if rank == 0:
        group = new_group("127.0.0.1", port, 0, 2, "nccl")
        meta, buffer = pack_bucket(named, torch.device("cuda"))
        queue.put(("meta", meta))
        broadcast(group, buffer)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            broadcast(group, buffer)
        torch.cuda.synchronize()
        queue.put(("seconds", (time.perf_counter() - start) / 5, meta.num_bytes))
    else:
        receiver = CollectiveReceiver("127.0.0.1", port, 1, 2, "nccl")
        meta = None
        while meta is None:
            kind, *value = queue.get()
            if kind == "meta":
                meta = value[0]
            else:
                queue.put((kind, *value))
        received = receiver.receive(meta)
        for _ in range(5):
            receiver.receive(meta)
        ok = all(torch.equal(got.cpu(), want.cpu()) and name == want_name
                 for (name, got), (want_name, want) in zip(received, named))
        queue.put(("ok", ok))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank (shared GPU = CUDA IPC)")
def test_collective_transport_broadcast_over_nccl() -> None:
    import torch.multiprocessing as mp

    from actors.weight_group import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port, nbytes = free_port(), 256 * 2**20
    procs = [context.Process(target=_broadcast_worker, args=(r, port, nbytes, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    results = {}
    while not queue.empty():
        kind, *value = queue.get()
        results[kind] = value
    assert all(proc.exitcode == 0 for proc in procs)
    assert results["ok"] == [True]
    seconds, num_bytes = results["seconds"]
    print(f"\nNCCL broadcast of one {num_bytes / 2**20:.0f} MiB bucket: {seconds * 1e3:.2f} ms, "
          f"{num_bytes / seconds / 1e9:.1f} GB/s")
