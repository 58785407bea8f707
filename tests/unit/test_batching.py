"""Sharding and token-budget packing of a GRPO batch (pipeline/batching.py); expected plans worked by hand."""

from __future__ import annotations

import random

import pytest

from pipeline.batching import pack_by_token_budget, padded_tokens, plan_micro_batches, shard_sequences


def test_docstring_example() -> None:
    assert plan_micro_batches([90, 40, 40, 30], world_size=2, token_budget=100) == [[(0,), ()], [(1, 2), (3,)]]


def test_padded_tokens_counts_padding_to_the_longest() -> None:
    assert padded_tokens([10, 30, 20], (0, 2)) == 40
    assert padded_tokens([10, 30, 20], ()) == 0


def test_shard_balances_tokens_longest_first() -> None:
    # 50 -> r0, 40 -> r1, 30 -> r1 (40 < 50), 20 -> r0 (50 < 70), 10 -> r0 (70 = 70, lower rank)
    assert shard_sequences([10, 20, 30, 40, 50], 2) == [[0, 1, 4], [2, 3]]


def test_shard_with_more_ranks_than_sequences_leaves_empty_shards() -> None:
    assert shard_sequences([5, 7], 3) == [[1], [0], []]


def test_pack_respects_budget_and_keeps_batch_order() -> None:
    lengths = [30, 60, 30, 30, 10]
    # longest first: 60 alone (2 x 60 > 100); 30, 30, 30 (3 x 30 = 90); 10 would make 4 x 30 = 120
    assert pack_by_token_budget(lengths, range(5), 100) == [(1,), (0, 2, 3), (4,)]


def test_sequence_longer_than_budget_gets_its_own_micro_batch() -> None:
    assert pack_by_token_budget([500, 20, 20], [0, 1, 2], 100) == [(0,), (1, 2)]


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        pack_by_token_budget([1], [0], 0)
    with pytest.raises(ValueError):
        shard_sequences([1], 0)


def test_empty_batch_plans_one_empty_micro_batch_per_rank() -> None:
    assert plan_micro_batches([], world_size=2, token_budget=10) == [[()], [()]]


@pytest.mark.parametrize("seed", range(20))
def test_plan_invariants_on_random_batches(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 40))]
    world, budget = rng.randint(1, 4), rng.randint(50, 400)
    plan = plan_micro_batches(lengths, world, budget)
    assert len(plan) == world
    assert len({len(row) for row in plan}) == 1  # same micro-batch count on every rank (ZeRO-3 lock-step)
    seen = sorted(i for row in plan for mb in row for i in mb)
    assert seen == list(range(len(lengths)))  # every sequence exactly once
    for row in plan:
        for mb in row:
            assert len(mb) <= 1 or padded_tokens(lengths, mb) <= budget
            assert list(mb) == sorted(mb)
