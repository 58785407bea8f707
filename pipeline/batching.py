"""Sharding a GRPO batch over learner ranks and packing each share into micro-batches by token budget.

Pure code (no torch): the learner ranks all run `plan_micro_batches` on the same batch and each takes its
own row, so no rank has to tell the others what it does.

Why every rank gets the same number of micro-batches: under ZeRO-3 each forward all-gathers the
parameters and each backward reduce-scatters the gradients, collectives that every rank must enter in
step. A rank with less data pads its plan with empty micro-batches (`()`), which the learner runs on a
stand-in sequence with zero loss weight.

The cost of a micro-batch is its padded size, `len(mb) * longest`, since sequences are right-padded to the
longest one. A sequence longer than the budget gets a micro-batch of its own. Micro-batches are cut from
the sequences sorted by length, so the padding is only the length spread inside one micro-batch (the
learner reports the `positions` it ran beside `tokens`).

Rows inside a micro-batch (`pack_rows`): the learner lays a micro-batch's sequences back to back in rows
without padding between them (pipeline/logprobs.py: each sequence's positions restart at 0, so attention
stays inside it). What a row may hold depends on the attention kernel. With a variable-length kernel
(flash-attention on a GPU) the whole micro-batch is one row and no position is padding. With SDPA (CPUs,
and GPUs without flash-attention) the packed row's block-diagonal mask is a dense [N, N] one: k sequences
of n tokens in one row cost (kn)^2 of attention against k n^2 in k rows. There a row holds at most the
micro-batch's longest sequence, so short sequences share a row and a micro-batch never costs more than
its padded form (rows x longest row <= sequences x longest sequence).

Shared prompts (`plan_shared_micro_batches`, the learner's default with SDPA): a micro-batch is one row in
which each pair's prompt appears once, before its completions (pipeline/shared_prompt.py), so it costs
sum(P) + sum(C) and the planning unit is a pair's sequences, kept together as far as the budget allows.

    plan_micro_batches(lengths=[90, 40, 40, 30], world_size=2, token_budget=100)
    # -> [[(0,), ()], [(1, 2), (3,)]]: rank 0 pads with an empty micro-batch
    pack_rows(lengths=[90, 40, 40, 30], row_tokens=0)    # -> [[0], [1, 2], [3]]: rows of <= 90 tokens
    plan_shared_micro_batches(prompt_lengths=[10, 10, 20], completion_lengths=[5, 8, 6],
                              prompt_ids=["a", "a", "b"], world_size=1, token_budget=30)
    # -> [[(2,), (0, 1)]]: pair b costs 20 + 6 = 26, pair a 10 + 5 + 8 = 23: a micro-batch each, longest first
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.types import ScoredGroup, TrainBatch, TrainSequence

MicroBatch = tuple[int, ...]  # indices into the batch's sequences


def padded_tokens(lengths: Sequence[int], micro_batch: Sequence[int]) -> int:
    """Tokens a right-padded micro-batch occupies: count x longest."""
    return len(micro_batch) * max((lengths[i] for i in micro_batch), default=0)


def shard_sequences(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split sequence indices over ranks, balancing tokens (longest first onto the lightest rank).

    Deterministic: ties go to the lower index and the lower rank. Each shard keeps batch order.
    """
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].append(index)
        load[rank] += lengths[index]
    return [sorted(shard) for shard in shards]


def pack_by_token_budget(lengths: Sequence[int], indices: Sequence[int], token_budget: int) -> list[MicroBatch]:
    """Pack `indices` into micro-batches whose padded size stays within `token_budget`.

    Longest first, so each micro-batch's first sequence sets its padded length; a new micro-batch starts
    when adding the next sequence would exceed the budget. Indices inside a micro-batch are in batch order.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    packed: list[list[int]] = []
    for index in order:
        current = packed[-1] if packed else None
        # Sorted descending, so the current micro-batch's longest is its first element.
        if current is not None and (len(current) + 1) * lengths[current[0]] <= token_budget:
            current.append(index)
        else:
            packed.append([index])
    return [tuple(sorted(mb)) for mb in packed]


def plan_micro_batches(lengths: Sequence[int], world_size: int, token_budget: int) -> list[list[MicroBatch]]:
    """[rank][micro-batch] -> sequence indices; every rank gets the same count, padded with `()`."""
    shards = shard_sequences(lengths, world_size)
    per_rank = [pack_by_token_budget(lengths, shard, token_budget) for shard in shards]
    count = max(1, max(len(mbs) for mbs in per_rank))
    return [mbs + [()] * (count - len(mbs)) for mbs in per_rank]


def plan_shared_micro_batches(prompt_lengths: Sequence[int], completion_lengths: Sequence[int],
                              prompt_ids: Sequence[object], world_size: int,
                              token_budget: int) -> list[list[MicroBatch]]:
    """[rank][micro-batch] -> sequence indices, for the shared-prompt layout (pipeline/shared_prompt.py),
    where a micro-batch costs each distinct prompt once plus its completions: sum(P) + sum(C).

    The unit is a pair's sequences (those with the same `prompt_ids` entry), so a prompt is shared by as
    many of its completions as fit: a pair that alone exceeds the budget is cut into chunks of completions,
    each with its prompt. Units are sharded over ranks (longest first onto the lightest rank) and packed
    first-fit decreasing into micro-batches of at most `token_budget` (a unit longer than the budget, i.e.
    one prompt and one completion, gets its own). Every rank gets the same count, padded with `()`."""
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    units = pair_units(prompt_lengths, completion_lengths, prompt_ids, token_budget)
    cost = [prompt_lengths[unit[0]] + sum(completion_lengths[i] for i in unit) for unit in units]
    shards = shard_sequences(cost, world_size)
    per_rank = []
    for shard in shards:
        bins: list[list[int]] = []
        fill: list[int] = []
        for u in sorted(shard, key=lambda u: (-cost[u], u)):
            slot = next((b for b in range(len(bins)) if fill[b] + cost[u] <= token_budget), None)
            if slot is None:
                bins.append([])
                fill.append(0)
                slot = len(bins) - 1
            bins[slot].extend(units[u])
            fill[slot] += cost[u]
        per_rank.append([tuple(sorted(b)) for b in bins])
    count = max(1, max(len(mbs) for mbs in per_rank))
    return [mbs + [()] * (count - len(mbs)) for mbs in per_rank]


def pair_units(prompt_lengths: Sequence[int], completion_lengths: Sequence[int], prompt_ids: Sequence[object],
               token_budget: int) -> list[tuple[int, ...]]:
    """Sequence indices grouped by prompt (first appearance order), a group cut where its prompt plus its
    completions would exceed `token_budget` (at least one completion per unit)."""
    groups: dict[object, list[int]] = {}
    for index, key in enumerate(prompt_ids):
        groups.setdefault(key, []).append(index)
    units: list[tuple[int, ...]] = []
    for members in groups.values():
        chunk: list[int] = []
        fill = prompt_lengths[members[0]]
        for index in members:
            if chunk and fill + completion_lengths[index] > token_budget:
                units.append(tuple(chunk))
                chunk, fill = [], prompt_lengths[members[0]]
            chunk.append(index)
            fill += completion_lengths[index]
        units.append(tuple(chunk))
    return units


def pack_rows(lengths: Sequence[int], row_tokens: int | None) -> list[list[int]]:
    """Positions in `lengths` -> rows of at most max(`row_tokens`, longest) tokens, first-fit decreasing
    (deterministic: ties by index); each row keeps its sequences in index order, rows ordered by their first
    sequence. None: one sequence per row (the right-padded layout)."""
    if row_tokens is None:
        return [[i] for i in range(len(lengths))]
    capacity = max(row_tokens, max(lengths, default=0))
    rows: list[list[int]] = []
    fill: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r in range(len(rows)) if fill[r] + lengths[index] <= capacity), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(index)
        fill[row] += lengths[index]
    return sorted(sorted(row) for row in rows)


def row_tokens_for(attn_implementation: str, token_budget: int) -> int:
    """`pack_rows`' capacity for a model's attention kernel: the whole micro-batch in one row where the
    kernel is variable-length (flash-attention), else 0 (rows as long as the longest sequence: SDPA's
    packed mask is dense)."""
    return token_budget if attn_implementation.startswith("flash") else 0


def train_batch_from_groups(step: int, policy_version: int, groups: Sequence[ScoredGroup]) -> TrainBatch:
    """One `TrainSequence` per non-empty completion of the kept groups, each with its group-relative advantage.

    `groups` are the groups the reward aggregator kept (it drops zero-variance groups); the advantage of
    completion g is `advantages[g]`; an empty completion (no tokens to score) is left out; images stay in
    the prompt's order (image 1, image 2), whichever one is preferred.
    """
    for scored in groups:
        if len(scored.advantages) != len(scored.group.completions):
            raise ValueError(f"pair {scored.group.pair_id}: {len(scored.advantages)} advantages for "
                             f"{len(scored.group.completions)} completions")
    sequences = tuple(
        TrainSequence(
            pair_id=scored.group.pair_id, completion_index=completion.completion_index,
            prompt_token_ids=scored.group.prompt_token_ids, completion_token_ids=completion.token_ids,
            rollout_logprobs=completion.logprobs, advantage=float(advantage),
            images=(scored.group.pair.image_1, scored.group.pair.image_2))
        for scored in groups
        for completion, advantage in zip(scored.group.completions, scored.advantages)
        if len(completion.token_ids) > 0
    )
    return TrainBatch(step=step, policy_version=policy_version, sequences=sequences)
