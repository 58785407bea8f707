"""pipeline/batching.py: sharding and token-budget packing of a GRPO batch, and advantages to sequences
(train_batch_from_groups); expected plans, sequences and micro-batch tensors worked by hand."""

from __future__ import annotations

import random

import pytest

from pipeline.batching import (pack_by_token_budget, pack_rows, padded_tokens, pair_units, plan_micro_batches,
                               plan_shared_micro_batches, row_tokens_for, shard_sequences)


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


# --- advantages to sequences (train_batch_from_groups) ----------------------------------------------------

IMG = 9


def _scored(pair_id: str, preferred: int, prompt: list[int], completions: list[list[int]], advantages: list[float]):
    import numpy as np
    from PIL import Image

    from pipeline.types import Completion, PreferencePair, RolloutGroup, ScoredGroup

    pair = PreferencePair(pair_id=pair_id, prompt="p", image_1=Image.new("RGB", (4, 4), "red"),
                          image_2=Image.new("RGB", (4, 4), "blue"), preferred=preferred)
    comps = tuple(Completion(pair_id=pair_id, completion_index=g, policy_version=3,
                             token_ids=np.array(tokens, dtype=np.int64),
                             logprobs=-0.1 * np.arange(1, len(tokens) + 1, dtype=np.float32), text="",
                             finish_reason="stop")
                  for g, tokens in enumerate(completions))
    group = RolloutGroup(pair=pair, prompt_token_ids=np.array(prompt, dtype=np.int64), completions=comps,
                         policy_version=3)
    return ScoredGroup(group=group, rewards=(), advantages=np.array(advantages, dtype=np.float32))


def _two_groups():
    # pair "a": image 2 preferred, G=3, completion 2 is empty; pair "b": image 1 preferred, G=2.
    # (The aggregator already dropped a zero-variance group: it is simply not among the groups.)
    return [_scored("a", 2, [1, IMG, IMG, 2], [[5, 6, 7], [8], []], [0.5, -1.5, 1.0]),
            _scored("b", 1, [1, IMG, IMG], [[4, 4], [3, 2]], [-0.25, 0.25])]


def test_each_completion_gets_its_own_groups_advantage_in_order() -> None:
    from pipeline.batching import train_batch_from_groups

    groups = _two_groups()
    batch = train_batch_from_groups(step=7, policy_version=3, groups=groups)
    assert (batch.step, batch.policy_version) == (7, 3)
    got = [(s.pair_id, s.completion_index, s.completion_token_ids.tolist(), s.advantage) for s in batch.sequences]
    # a/2 is empty: dropped, and the advantages after it do not shift (a/2's 1.0 goes nowhere)
    assert got == [("a", 0, [5, 6, 7], 0.5), ("a", 1, [8], -1.5), ("b", 0, [4, 4], -0.25), ("b", 1, [3, 2], 0.25)]
    assert [s.prompt_token_ids.tolist() for s in batch.sequences] == [[1, IMG, IMG, 2]] * 2 + [[1, IMG, IMG]] * 2
    expected_logprobs = [[-0.1, -0.2, -0.3], [-0.1], [-0.1, -0.2], [-0.1, -0.2]]
    for sequence, expected in zip(batch.sequences, expected_logprobs, strict=True):
        assert sequence.rollout_logprobs.tolist() == pytest.approx(expected)
    assert batch.num_completion_tokens == 3 + 1 + 2 + 2


@pytest.mark.parametrize("preferred", [1, 2])
def test_images_keep_the_prompts_order_whichever_is_preferred(preferred: int) -> None:
    from pipeline.batching import train_batch_from_groups

    scored = _scored("c", preferred, [IMG, IMG], [[5]], [1.0])
    (sequence,) = train_batch_from_groups(0, 0, [scored]).sequences
    assert sequence.images[0] is scored.group.pair.image_1 and sequence.images[1] is scored.group.pair.image_2


def test_advantages_reach_the_rows_and_tokens_of_a_micro_batch() -> None:
    """Groups -> batch -> one micro-batch's tensors: each row's advantage, targets and mask, by hand."""
    import torch

    from pipeline.batching import train_batch_from_groups
    from pipeline.logprobs import VisionSpec, build_inputs

    def image_processor(images, return_tensors):  # grid 1 x 1 x 4: 4 patches = one image token at merge 2
        return {"pixel_values": torch.ones(4 * len(images), 3),
                "image_grid_thw": torch.tensor([[1, 1, 4]] * len(images))}

    batch = train_batch_from_groups(0, 0, _two_groups())
    spec = VisionSpec(image_token_id=IMG, pad_token_id=0, merge_size=2)
    inputs = build_inputs(batch.sequences, image_processor, spec)
    assert inputs.advantages_B.tolist() == [0.5, -1.5, -0.25, 0.25]
    assert inputs.targets_BT.tolist() == [[5, 6, 7], [8, 0, 0], [4, 4, 0], [3, 2, 0]]
    assert inputs.mask_BT.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    # prompt lengths 4, 4, 3, 3; one sequence per row (row_tokens None), rows of N = 7 positions: completion
    # token t of sequence b is predicted at flat position b * N + P_b - 1 + t
    assert inputs.input_ids_RN.shape == (4, 7)
    assert inputs.positions_BT[inputs.mask_BT].tolist() == [3, 4, 5, 7 + 3, 14 + 2, 14 + 3, 21 + 2, 21 + 3]


def test_advantage_count_must_match_the_completions() -> None:
    from pipeline.batching import train_batch_from_groups

    with pytest.raises(ValueError, match="pair a: 2 advantages for 3 completions"):
        train_batch_from_groups(0, 0, [_scored("a", 1, [1], [[5], [6], [7]], [0.5, -0.5])])


def test_pack_rows_first_fit_decreasing_within_the_longest() -> None:
    # capacity max(0, 90) = 90: 90 alone; 40 + 40 = 80 share a row; 30 no longer fits beside them
    assert pack_rows([90, 40, 40, 30], row_tokens=0) == [[0], [1, 2], [3]]
    # capacity 150: 90 + 40 = 130; the second 40 opens row 2; 30 fits beside it (70), not beside 130
    assert pack_rows([90, 40, 40, 30], row_tokens=150) == [[0, 1], [2, 3]]
    assert pack_rows([90, 40, 40, 30], row_tokens=200) == [[0, 1, 2, 3]]  # 200 exactly: one row
    assert pack_rows([30, 40, 50], row_tokens=None) == [[0], [1], [2]]  # the right-padded layout
    assert pack_rows([5, 5, 5, 5], row_tokens=0) == [[0], [1], [2], [3]]  # equal lengths: nothing shares


def test_pack_rows_keeps_every_sequence_once_and_each_row_within_capacity() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 30))]
        budget = rng.choice([None, 0, 64, 200, 10_000])
        rows = pack_rows(lengths, budget)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        capacity = max(lengths) if budget is None else max(budget, max(lengths))
        assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
        # never more positions than the padded layout (rows x longest row <= sequences x longest sequence)
        assert len(rows) * max(sum(lengths[i] for i in row) for row in rows) <= len(lengths) * max(lengths) \
            or budget not in (None, 0)


def test_row_tokens_follow_the_attention_kernel() -> None:
    assert row_tokens_for("flash_attention_2", 16384) == 16384  # varlen: the whole micro-batch in one row
    assert row_tokens_for("sdpa", 16384) == 0 and row_tokens_for("eager", 4096) == 0


# ---- shared prompts: micro-batches planned by pair ------------------------------------------------------

def test_shared_plan_docstring_example() -> None:
    assert plan_shared_micro_batches([10, 10, 20], [5, 8, 6], ["a", "a", "b"], world_size=1,
                                     token_budget=30) == [[(2,), (0, 1)]]


def test_pair_units_cut_a_pair_where_its_prompt_and_completions_pass_the_budget() -> None:
    """Pair a (prompt 10): 10 + 5 = 15, + 30 would be 45 > 40, so 1 starts a unit (40), 2 another (18);
    pair b (prompt 20): 20 + 4 + 6 = 30 stays whole."""
    units = pair_units([10, 10, 10, 20, 20], [5, 30, 8, 4, 6], ["a", "a", "a", "b", "b"], token_budget=40)
    assert units == [(0,), (1,), (2,), (3, 4)]


def test_shared_plan_packs_pair_units_first_fit_decreasing() -> None:
    """Units cost 15, 40, 18 and 30 (above). One rank: 40 fills a micro-batch, 30 opens the next, 18 fits
    with neither and opens a third, 15 joins it (33). Two ranks: 40 and 15 on rank 0 (55 < 30 + 18), 30
    and 18 on rank 1, each in two micro-batches."""
    args = ([10, 10, 10, 20, 20], [5, 30, 8, 4, 6], ["a", "a", "a", "b", "b"])
    assert plan_shared_micro_batches(*args, world_size=1, token_budget=40) == [[(1,), (3, 4), (0, 2)]]
    assert plan_shared_micro_batches(*args, world_size=2, token_budget=40) == [[(1,), (0,)], [(3, 4), (2,)]]


def test_shared_plan_gives_a_prompt_and_completion_over_the_budget_its_own_micro_batch() -> None:
    """Pair a: 50 + 60 = 110 and 50 + 70 = 120, each over 100 alone; pair b's 6 joins neither."""
    assert plan_shared_micro_batches([50, 50, 5], [60, 70, 1], ["a", "a", "b"], world_size=1,
                                     token_budget=100) == [[(1,), (0,), (2,)]]


def test_shared_plan_of_an_empty_batch_is_one_empty_micro_batch_per_rank() -> None:
    assert plan_shared_micro_batches([], [], [], world_size=2, token_budget=10) == [[()], [()]]
    with pytest.raises(ValueError, match="token_budget"):
        plan_shared_micro_batches([1], [1], ["a"], world_size=1, token_budget=0)


@pytest.mark.parametrize("seed", range(20))
def test_shared_plan_invariants_on_random_batches(seed: int) -> None:
    """Every sequence once; the same count per rank; a micro-batch of several units within the budget
    (each prompt counted once); a pair that fits the budget whole stays in one micro-batch."""
    rng = random.Random(seed)
    pairs, group = rng.randint(1, 12), rng.randint(1, 8)
    prompt_of = {p: rng.randint(5, 60) for p in range(pairs)}
    ids = [p for p in range(pairs) for _ in range(group)]
    rng.shuffle(ids)
    prompts, completions = [prompt_of[p] for p in ids], [rng.randint(1, 80) for _ in ids]
    world, budget = rng.randint(1, 3), rng.randint(60, 400)
    plan = plan_shared_micro_batches(prompts, completions, ids, world, budget)
    assert len({len(mbs) for mbs in plan}) == 1
    placed = sorted(i for mbs in plan for mb in mbs for i in mb)
    assert placed == list(range(len(ids)))
    where = {i: (r, m) for r, mbs in enumerate(plan) for m, mb in enumerate(mbs) for i in mb}
    for mbs in plan:
        for mb in mbs:
            cost = sum(prompt_of[p] for p in {ids[i] for i in mb}) + sum(completions[i] for i in mb)
            single_unit = len({ids[i] for i in mb}) == 1
            assert cost <= budget or single_unit
    for p in range(pairs):
        members = [i for i in range(len(ids)) if ids[i] == p]
        if prompt_of[p] + sum(completions[i] for i in members) <= budget:
            assert len({where[i] for i in members}) == 1
