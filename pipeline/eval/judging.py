"""What `evaluate` asks the reasoner and how its answers become per-pair rows (pure: no engine).

    comparisons = pairwise_comparisons(groups, seed)      # or anchor_comparisons; with_swapped_orders
    rows = pairwise_rows(comparisons, rollouts, scores)     # or anchor_rows(groups, comparisons, p_image_1)

A failed answer, in both modes, is a comparison with no parsed answer: a completion that did not parse,
or a prompt that did not fit the engine (`TOO_LONG`: no rollout at all). Pairwise, such a pair has no
prediction and counts as wrong; with `--anchor`, the image compared has no score and every pair it is in
counts as wrong (`pipeline.eval.protocol.anchor_scores`). Why wrong rather than left out: leaving pairs out
would let a model raise its accuracy by failing on the hard ones, and ImageReward's `test.py` already
counts a model that cannot separate two images (a tie) as wrong.

Tests: `.venv/bin/python -m pytest tests/unit/test_eval_protocol.py`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from pipeline.data.formats import swapped
from pipeline.eval.groups import RankedGroup
from pipeline.eval.protocol import (PairRow, anchor_scores, imagereward_pairs, row_from_answers, rows_from_scores)
from pipeline.eval.stats import SWAPPED_SUFFIX, mean_or_none
from pipeline.prompts import parse_completion
from pipeline.rewards import is_contradiction
from pipeline.types import ListenerScore, PreferencePair, RolloutGroup

TOO_LONG = "prompt_too_long"  # a comparison whose prompt is longer than the engine's max_model_len


# ---------------------------------------------------------------- what to ask


@dataclass(frozen=True)
class Comparison:
    """One question to the reasoner: a pair as shown, plus where it came from."""

    pair: PreferencePair
    group_index: int
    first: int = -1  # anchor mode: index in the group of the image shown as image 1
    second: int = -1  # anchor mode: index of the image shown as image 2


def pairwise_comparisons(groups: list[RankedGroup], seed: int) -> list[Comparison]:
    """Every ImageReward pair of every group, in its seeded image order."""
    return [Comparison(pair=pair, group_index=g) for g, group in enumerate(groups) for pair in group.pairs(seed)]


def with_swapped_orders(comparisons: list[Comparison]) -> list[Comparison]:
    """Each comparison, then the same with its images swapped (id + `SWAPPED_SUFFIX`, gold swapped too)."""
    out = []
    for c in comparisons:
        pair = c.pair
        flipped = replace(pair, pair_id=pair.pair_id + SWAPPED_SUFFIX, image_1=pair.image_2, image_2=pair.image_1,
                          preferred=3 - pair.preferred)
        out += [c, Comparison(pair=flipped, group_index=c.group_index, first=c.second, second=c.first)]
    return out


def anchor_comparisons(groups: list[RankedGroup], seed: int, anchor: int = 0) -> list[Comparison]:
    """Image k of each group against the group's image `anchor` (n-1 per group), seeded order."""
    out = []
    for g, group in enumerate(groups):
        for k in range(len(group.images)):
            if k == anchor:
                continue
            pair_id = f"{group.group_id}:anchor{anchor}-{k}"
            first, second = (anchor, k) if swapped(seed, pair_id) else (k, anchor)
            ranks = group.ranks
            preferred = 1 if ranks[first] <= ranks[second] else 2  # gold of the comparison; unused on ties
            out.append(Comparison(pair=PreferencePair(
                pair_id=pair_id, prompt=group.prompt, image_1=group.images[first], image_2=group.images[second],
                preferred=preferred, prompt_id=group.prompt_id, category=group.category),
                group_index=g, first=first, second=second))
    return out


# ---------------------------------------------------------------- judging (pure)


def answers_of(group: RolloutGroup) -> list[int | None]:
    return [parse_completion(c.text).answer for c in group.completions]


def listener_counts(group: RolloutGroup, scores: dict[tuple[str, int], ListenerScore] | None) -> tuple[int, int]:
    """(contradictions, judged) over a group's completions: parsed answers with a usable listener score."""
    if scores is None:
        return 0, 0
    contradictions = judged = 0
    for completion, answer in zip(group.completions, answers_of(group), strict=True):
        score = scores.get((completion.pair_id, completion.completion_index))
        if answer is None or score is None or not score.usable:
            continue
        judged += 1
        contradictions += is_contradiction(answer, score, group.pair.preferred)
    return contradictions, judged


def pairwise_rows(comparisons: list[Comparison], rollouts: dict[str, RolloutGroup],
                  scores: dict | None) -> list[PairRow]:
    """One row per comparison: majority vote of its completions against the gold image. A comparison
    with no rollout (its prompt did not fit the engine) is a failed answer: wrong, `failed` = TOO_LONG."""
    rows = []
    for comparison in comparisons:
        pair = comparison.pair
        group = rollouts.get(pair.pair_id)
        if group is None:
            rows.append(replace(row_from_answers(pair.pair_id, pair.prompt_id, pair.preferred, [], pair.category),
                                failed=TOO_LONG))
            continue
        row = row_from_answers(pair.pair_id, pair.prompt_id, pair.preferred, answers_of(group), pair.category)
        contradictions, judged = listener_counts(group, scores)
        rows.append(replace(row, contradictions=contradictions, listened=judged))
    return rows


def anchor_rows(groups: list[RankedGroup], comparisons: list[Comparison], p_image_1: dict[str, float | None],
                anchor: int = 0) -> list[PairRow]:
    """ImageReward pairs judged by continuous scores: image k's score is p(image k over the anchor), the
    reasoner's probability of naming k at the answer position (`p_image_1[pair_id]`: p of the image shown
    first, None when no answer parsed), averaged over the orders it was asked in. Equal scores tie."""
    asked: dict[tuple[int, int], list[float | None]] = defaultdict(list)
    for comparison in comparisons:
        k = comparison.first if comparison.first != anchor else comparison.second
        p = p_image_1.get(comparison.pair.pair_id)
        asked[comparison.group_index, k].append(None if p is None else p if comparison.first == k else 1.0 - p)
    p_over = {g: [mean_or_none(asked.get((g, k), [])) for k in range(len(group.images))]
              for g, group in enumerate(groups)}
    rows = []
    for g, group in enumerate(groups):
        scores = anchor_scores(p_over[g], anchor)
        pair_ids = [group.pair_id(i, j) for i, j, _ in imagereward_pairs(group.ranks)]
        rows += rows_from_scores(group.prompt_id, group.ranks, scores, pair_ids, group.category)
    return rows


def comparison_counts(comparisons: list[Comparison], rollouts: dict[str, RolloutGroup],
                      scores: dict | None) -> dict[str, int]:
    """Counts over every completion asked for (both modes); `comparison_stats` turns sums of them into rates."""
    counts = dict.fromkeys(("comparisons", "completions", "unparsable", "contradictions", "listened", TOO_LONG), 0)
    for comparison in comparisons:
        counts["comparisons"] += 1
        group = rollouts.get(comparison.pair.pair_id)
        if group is None:
            counts[TOO_LONG] += 1
            continue
        answers = answers_of(group)
        counts["completions"] += len(answers)
        counts["unparsable"] += sum(a is None for a in answers)
        contradictions, judged = listener_counts(group, scores)
        counts["contradictions"] += contradictions
        counts["listened"] += judged
    return counts


def comparison_stats(comparisons: list[Comparison], rollouts: dict[str, RolloutGroup],
                     scores: dict | None, counts: dict[str, int] | None = None) -> dict[str, float | int | None]:
    """Unparsable and contradiction rates over every completion asked for, and the comparisons skipped
    because their prompt did not fit (`counts`: summed `comparison_counts` of several chunks)."""
    c = counts if counts is not None else comparison_counts(comparisons, rollouts, scores)
    return {"comparisons": c["comparisons"], "completions": c["completions"],
            "unparsable_rate": c["unparsable"] / c["completions"] if c["completions"] else 0.0,
            "contradiction_rate": c["contradictions"] / c["listened"] if c["listened"] else None,
            "skipped_comparisons": {TOO_LONG: c[TOO_LONG]}}
