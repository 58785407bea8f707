"""Bucket planning and packing of the weight sync, RNG-state round trip and pruning of checkpoints
(torch only: a plain module stands in for the ZeRO-3 model; the real one is in tests/integration)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from actors.checkpoint import latest_checkpoint, list_checkpoints, prune, rng_state, set_rng_state
from actors.weight_sync import full_bytes, pack_bucket, plan_buckets, unpack_bucket


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 100), torch.nn.Linear(100, 1))
    model[0].requires_grad_(False)  # frozen: skipped by the sync
    return model


def test_plan_buckets_cuts_by_bytes_and_skips_frozen() -> None:
    # trainable: 1.weight 4000 B, 1.bias 400 B, 2.weight 400 B, 2.bias 4 B; budget 1000 B
    buckets = plan_buckets(_model(), bucket_bytes=1000)
    assert [[name for name, _ in b] for b in buckets] == [["1.weight"], ["1.bias", "2.weight", "2.bias"]]
    with_frozen = plan_buckets(_model(), bucket_bytes=10**6, include_frozen=True)
    assert [name for name, _ in with_frozen[0]][:2] == ["0.weight", "0.bias"]


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
