"""Bucket planning and packing of the weight sync, RNG-state round trip and pruning of checkpoints
(torch only: a plain module stands in for the ZeRO-3 model; the real one is in tests/integration)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from actors.checkpoint import latest_checkpoint, list_checkpoints, prune, rng_state, set_rng_state
from actors.weight_buckets import (bucket_meta, byte_view, from_byte_arrays, pack_bucket, read_shared_bucket,
                                    unpack_bucket, write_bucket)
from actors.weight_sync import full_bytes, layer_key, plan_buckets


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 100), torch.nn.Linear(100, 1))
    model[0].requires_grad_(False)  # frozen: skipped by the sync
    return model


def test_plan_buckets_cuts_by_bytes_between_layers_and_skips_frozen() -> None:
    # trainable: layer "1" = 1.weight 4000 B + 1.bias 400 B, layer "2" = 2.weight 400 B + 2.bias 4 B; budget
    # 1000 B: layer 1 is bigger than a bucket and goes alone, whole; layer 2 fits in the next.
    buckets = plan_buckets(_model(), bucket_bytes=1000)
    assert [[name for name, _ in b] for b in buckets] == [["1.weight", "1.bias"], ["2.weight", "2.bias"]]
    assert len(plan_buckets(_model(), bucket_bytes=4804)) == 1 and len(plan_buckets(_model(), bucket_bytes=4803)) == 2
    with_frozen = plan_buckets(_model(), bucket_bytes=10**6, include_frozen=True)
    assert [name for name, _ in with_frozen[0]][:2] == ["0.weight", "0.bias"]


def test_layer_key_keeps_fused_projections_together() -> None:
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias"
    assert layer_key(q) == layer_key(k) == "model.layers.0.self_attn"
    assert layer_key("model.layers.0.mlp.gate_proj.weight") == layer_key("model.layers.0.mlp.up_proj.weight")
    assert layer_key("model.layers.1.self_attn.q_proj.weight") != layer_key(q)
    assert layer_key("lm_head.weight") == "lm_head"


def test_full_bytes_uses_ds_numel_for_partitioned_parameters() -> None:
    param = torch.nn.Parameter(torch.empty(0))
    param.ds_numel = 1000  # what ZeRO-3 leaves on a partitioned parameter: numel() is 0
    assert full_bytes(param) == 4000


def test_pack_and_unpack_round_trip_mixed_dtypes() -> None:
    named = [("a", torch.randn(3, 5)), ("b", torch.randn(7).to(torch.bfloat16)), ("c", torch.arange(4))]
    meta, buffer = pack_bucket(named, torch.device("cpu"))
    assert meta.num_bytes == 64 + 16 + 32 == buffer.numel()  # 60 -> 64 and 14 -> 16: 16-byte aligned
    assert meta.dtypes == ("float32", "bfloat16", "int64") and meta.shapes == ((3, 5), (7,), (4,))
    for (name, want), (got_name, got) in zip(named, unpack_bucket(meta, buffer.clone())):
        assert name == got_name and got.dtype == want.dtype and torch.equal(got, want)


def test_views_of_one_flat_buffer_travel_as_their_own_bytes() -> None:
    """ZeRO-3 on one rank: every parameter is a view of one flat buffer. Pickled as tensors, each view
    carried the whole buffer (the 40 s mid sync); as numpy byte views each carries exactly its bytes."""
    import pickle

    flat = torch.randn(1000)
    named = [("a", flat[:100].view(10, 10)), ("b", flat[100:300]), ("c", flat[300:1000].view(7, 100))]
    assert len(pickle.dumps([t for _, t in named])) > 3 * 4000  # the bug, for reference: 3 whole buffers
    arrays = [byte_view(t) for _, t in named]
    assert [a.nbytes for a in arrays] == [400, 800, 2800]
    assert len(pickle.dumps(arrays, protocol=5)) < 4000 + 1000
    for (name, want), (got_name, got) in zip(named, from_byte_arrays(bucket_meta(named), arrays)):
        assert name == got_name and got.shape == want.shape and torch.equal(got, want)


def test_shared_bucket_is_read_in_place_from_the_staging_file(tmp_path) -> None:
    named = [("w", torch.randn(4, 3)), ("h", torch.randn(5).to(torch.bfloat16))]
    meta = bucket_meta(named)
    path = tmp_path / "staging"
    path.write_bytes(b"\0" * (meta.num_bytes + 64))  # a staging file may be bigger than the bucket
    staging = torch.from_file(str(path), shared=True, size=meta.num_bytes + 64, dtype=torch.uint8)
    write_bucket(named, staging)
    read = read_shared_bucket(str(path), meta)
    assert [(n, t.dtype) for n, t in read] == [("w", torch.float32), ("h", torch.bfloat16)]
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(read, named))
    write_bucket([("w", torch.zeros(4, 3)), ("h", named[1][1])], staging)
    assert torch.equal(read[0][1], torch.zeros(4, 3))  # a view of the file, not a copy: why a worker that
    # still holds views after a bucket makes the sender move to a new file


def test_rng_state_round_trips_through_json() -> None:
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_prune_keeps_the_last_finished_checkpoints(tmp_path) -> None:
    for step in (1, 2, 3, 10):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / "manifest.json").write_text("{}")
    (tmp_path / "step-00000011").mkdir()  # no manifest: unfinished, never counted
    (tmp_path / ".tmp-step-00000012").mkdir()
    prune(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000010"]
    assert latest_checkpoint(tmp_path).name == "step-00000010"


@pytest.mark.parametrize("keep", [0, 1])
def test_prune_keep_zero_keeps_everything_else_latest_only(tmp_path, keep: int) -> None:
    for step in (1, 2):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / "manifest.json").write_text("{}")
    prune(tmp_path, keep=keep)
    assert len(list_checkpoints(tmp_path)) == (2 if keep == 0 else 1)


def test_resume_refuses_unpickling_loads(tmp_path) -> None:
    from actors.checkpoint import only_weights_only_loads

    torch.save({"w": torch.ones(2)}, tmp_path / "t.pt")
    with only_weights_only_loads():
        assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["w"], torch.ones(2))
        with pytest.raises(RuntimeError, match="weights_only"):
            torch.load(tmp_path / "t.pt", weights_only=False)
    assert torch.load(tmp_path / "t.pt", weights_only=False)["w"].sum() == 2  # restored afterwards
