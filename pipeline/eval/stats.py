"""Evaluation summaries beyond the plain accuracy (pure): prompt- and vote-weighted accuracy, order effects,
and the answer prefix at which the reasoner's probability of each image is read.

- Pair-weighted accuracy (ImageReward's `test.py`): every pair counts once; `metrics.summarize` computes it.
- Prompt-weighted accuracy (HPS v2's ranking evaluation): per prompt, the fraction of its pairs ordered
  right, then the mean over prompts, so a prompt with 9 images (36 pairs) weighs as much as one with 2.
- Vote-weighted accuracy (pair sets with vote counts, Rapidata): the fraction of all human votes that
  went to the image the model chose; a tie or unparsable answer agrees with no vote.
- Both orders (`--both-orders`): accuracy of each order, their mean, and the position-bias rate: the
  fraction of pairs where both orders got a parsed answer naming the same position (image 1 twice or
  image 2 twice), i.e. the answer followed the position rather than the image.

Tests: `.venv/bin/python -m pytest tests/unit/test_eval_protocol.py`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from pipeline.eval.protocol import PairRow
from pipeline.prompts import parse_completion

SWAPPED_SUFFIX = "|swapped"  # pair id of the second order of a pair under --both-orders
_ANSWER_OPEN_RE = re.compile(r"<answer>\s*(?:image\s*)?(?=[12])", re.IGNORECASE)


def prompt_weighted_accuracy(rows: Sequence[PairRow]) -> float:
    """Mean over prompts of each prompt's pair accuracy (HPS v2); 0.0 without rows."""
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        by_prompt[row.prompt_id].append(row.correct)
    if not by_prompt:
        return 0.0
    return sum(sum(c) / len(c) for c in by_prompt.values()) / len(by_prompt)


def vote_weighted_accuracy(rows: Sequence[PairRow], votes: dict[str, tuple[float, float]]) -> float | None:
    """Fraction of human votes agreeing with the model; `votes[pair_id]` = (votes of the gold image, votes
    of the other) as the row's pair was shown (ids with `SWAPPED_SUFFIX` look up their base id). None
    when no row has votes."""
    agreed = total = 0.0
    for row in rows:
        found = votes.get(base_pair_id(row.pair_id))
        if found is None:
            continue
        gold_votes, other_votes = found
        total += gold_votes + other_votes
        agreed += gold_votes if row.predicted == row.gold else other_votes if row.predicted is not None else 0.0
    return agreed / total if total else None


def base_pair_id(pair_id: str) -> str:
    return pair_id.removesuffix(SWAPPED_SUFFIX)


def order_stats(rows: Sequence[PairRow]) -> dict[str, float | int]:
    """Accuracy per order, their mean and the position-bias rate, from rows of both orders (ids with and
    without `SWAPPED_SUFFIX`)."""
    first = {r.pair_id: r for r in rows if not r.pair_id.endswith(SWAPPED_SUFFIX)}
    second = {base_pair_id(r.pair_id): r for r in rows if r.pair_id.endswith(SWAPPED_SUFFIX)}
    both = [(first[k], second[k]) for k in first if k in second]
    if not both:
        return {}
    acc_1 = sum(a.correct for a, _ in both) / len(both)
    acc_2 = sum(b.correct for _, b in both) / len(both)
    same_position = sum(a.predicted is not None and a.predicted == b.predicted for a, b in both)
    return {"both_orders_pairs": len(both), "accuracy_order_shown": acc_1, "accuracy_order_swapped": acc_2,
            "accuracy_mean_of_orders": (acc_1 + acc_2) / 2, "position_bias_rate": same_position / len(both)}


def answer_prefix(text: str) -> str | None:
    """A well-formed completion up to (not including) its answer digit, where p(image k) is read; None
    when the completion does not parse."""
    if parse_completion(text).answer is None:
        return None
    start = text.lower().rfind("<answer>")
    match = _ANSWER_OPEN_RE.match(text, start)
    return text[:match.end()] if match else None


def mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
