"""Weight sync from a 2-rank ZeRO-3 learner (gloo) to 2 vLLM CPU rollout workers, both transports.

After each sync the workers' greedy completions must be token for token those of a transformers model
loaded with the learner's gathered weights; the learner takes a big step first so the new weights
visibly change the completions. The bucket is a fraction of the model, and the measured peak of gathered
parameters must stay within one bucket.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import AlgoConfig, EngineConfig, LearnerConfig, SyncConfig
from pipeline.synthetic import synthetic_pairs

pytestmark = pytest.mark.integration

# persistence threshold 0: every parameter is partitioned, so the gather is what materialises them.
LEARNER = LearnerConfig(num_ranks=2, lr=2e-2, micro_batch_tokens=512, num_cpus=1, zero3_persistence_threshold=0)
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def setup(ray_local, tiny_reasoner_dir):
    from actors.learner import LearnerGroup
    from actors.rollout import RolloutWorker

    worker_cls = ray_local.remote(RolloutWorker).options(num_cpus=1, resources={"rollout": 1})
    workers = [worker_cls.remote(str(tiny_reasoner_dir), EngineConfig(dtype="float32"), seed=0) for _ in range(2)]
    group = LearnerGroup(str(tiny_reasoner_dir), LEARNER, AlgoConfig(), seed=0, max_new_tokens=64)
    ray_local.get([w.ready.remote() for w in workers])
    yield group, workers
    group.shutdown()
    for worker in workers:
        ray_local.kill(worker)


def _greedy_from_workers(ray, workers, pairs) -> list[list[list[int]]]:
    groups = ray.get([w.generate.remote(pairs, 1, MAX_NEW_TOKENS, 0.0, 1.0) for w in workers])
    return [[g.completions[0].token_ids.tolist() for g in per_worker] for per_worker in groups]


def _greedy_from_transformers(model_dir: Path, state: dict[str, np.ndarray], tmp: Path, pairs) -> list[list[int]]:
    """Greedy tokens of a transformers model whose weights are `state` (checkpoint names)."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from pipeline.prompts import reasoner_prompt

    shutil.copytree(model_dir, tmp)
    save_file({name: np.ascontiguousarray(array) for name, array in state.items()}, str(tmp / "model.safetensors"))
    model = AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    completions = []
    for pair in pairs:
        enc = processor(text=[reasoner_prompt(pair.prompt)], images=[pair.image_1, pair.image_2], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        tokens = out[0, enc["input_ids"].shape[1]:].tolist()
        completions.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    return completions


@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_sync_reaches_every_worker_token_for_token(setup, ray_local, tiny_reasoner_dir, tiny_train_batch,
                                                   tmp_path, transport) -> None:
    group, workers = setup
    pairs = list(synthetic_pairs(seed=5, count=3))
    before = _greedy_from_workers(ray_local, workers, pairs)
    group.train_step(tiny_train_batch)
    trainable = group.gathered_state_dict(include_frozen=False)
    state = group.gathered_state_dict(include_frozen=True)
    model_bytes = sum(a.nbytes for a in trainable.values())
    bucket_bytes = model_bytes // 6  # several buckets; the largest parameter still fits in one
    assert max(a.nbytes for a in trainable.values()) <= bucket_bytes
    version = ray_local.get(workers[0].policy_version.remote()) + 1

    report = group.sync_weights(workers, version, SyncConfig(transport=transport, bucket_mb=bucket_bytes / 2**20))

    assert report.version == version and report.transport == transport
    assert report.num_bytes == model_bytes and report.num_buckets >= 6
    assert 0 < report.peak_gathered_bytes <= bucket_bytes  # measured: never more than one bucket gathered
    assert ray_local.get([w.policy_version.remote() for w in workers]) == [version, version]
    after = _greedy_from_workers(ray_local, workers, pairs)
    expected = _greedy_from_transformers(Path(tiny_reasoner_dir), state, tmp_path / "hf", pairs)
    assert after[0] == expected and after[1] == expected
    assert after[0] != before[0]  # the sync really changed what the engines generate


def test_checkpoint_export_loads_in_vllm_with_the_synced_weights(setup, ray_local, tmp_path) -> None:
    """The safetensors export of a checkpoint serves in vLLM exactly like the engines that were synced."""
    from actors.rollout import RolloutWorker

    group, workers = setup
    version = ray_local.get(workers[0].policy_version.remote()) + 1
    group.sync_weights(workers, version, SyncConfig(transport="object_store"))
    info = group.save_checkpoint(str(tmp_path), step=version, data_position={}, keep=1)
    fresh = ray_local.remote(RolloutWorker).options(num_cpus=1, resources={"rollout": 1}).remote(
        str(Path(info.path) / "policy"), EngineConfig(dtype="float32"), seed=0)
    try:
        pairs = list(synthetic_pairs(seed=6, count=3))
        synced, exported = _greedy_from_workers(ray_local, [workers[0], fresh], pairs)
    finally:
        ray_local.kill(fresh)
    assert synced == exported
