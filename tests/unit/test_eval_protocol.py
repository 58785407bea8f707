"""The ImageReward evaluation protocol (pipeline/metrics.py, the pure parts of pipeline/evaluate.py).

Every expected value is worked out by hand in the comments: which pairs a prompt's ranks make, how a
vote resolves, what accuracy the rows give when ties and unparsable answers count as wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.eval_data import RankedGroup
from pipeline.evaluate import (anchor_comparisons, anchor_rows, comparison_stats, pairwise_comparisons,
                               pairwise_rows, report_metrics)
from pipeline.metrics import (PairRow, anchor_scores, imagereward_pairs, majority_vote, row_from_answers,
                              rows_from_scores, summarize)
from pipeline.prompts import format_target
from pipeline.types import Completion, ListenerScore, RolloutGroup


def test_imagereward_pairs_skip_equal_ranks_and_prefer_the_lower_rank():
    # ranks 2, 1, 2, 3: (0,1) rank 1 wins -> image 2; (0,2) tie -> no pair; (0,3) 2 < 3 -> image 1;
    # (1,2) -> 1; (1,3) -> 1; (2,3) -> 1
    assert imagereward_pairs([2, 1, 2, 3]) == [(0, 1, 2), (0, 3, 1), (1, 2, 1), (1, 3, 1), (2, 3, 1)]
    assert imagereward_pairs([1, 1, 1]) == []
    assert len(imagereward_pairs([1, 2, 3, 4, 5, 6])) == 15  # all distinct: n(n-1)/2


@pytest.mark.parametrize(("answers", "predicted", "votes"), [
    ([1, 1, 2], 1, (2, 1, 0)),
    ([2, None, 2, 1], 2, (1, 2, 1)),
    ([1, 2], None, (1, 1, 0)),  # a tie between the images predicts nothing
    ([None, None], None, (0, 0, 2)),  # nothing parsed
    ([1, None, None], 1, (1, 0, 2)),  # unparsable answers do not vote
])
def test_majority_vote(answers, predicted, votes):
    vote = majority_vote(answers)
    assert vote.predicted == predicted
    assert (vote.votes_1, vote.votes_2, vote.unparsable) == votes


def test_accuracy_counts_ties_and_unparsable_as_wrong():
    rows = [
        row_from_answers("a:0-1", "a", 1, [1, 1, 2], "animals"),  # predicted 1, right; p = 2/3
        row_from_answers("a:0-2", "a", 1, [1, 2, None], "animals"),  # 1-1 tie: wrong; p = 1/3
        row_from_answers("a:1-2", "a", 2, [None, None, None], "animals"),  # unparsable: wrong; p = 0
        row_from_answers("b:0-1", "b", 2, [2, 2, 2], "cars"),  # right; p = 1
        row_from_answers("b:0-2", "b", 1, [2, 2, 1], "cars"),  # wrong; p = 1/3
    ]
    assert [r.correct for r in rows] == [True, False, False, True, False]
    assert [r.p_preferred for r in rows] == pytest.approx([2 / 3, 1 / 3, 0.0, 1.0, 1 / 3])
    summary = summarize(rows)
    assert summary["accuracy"] == pytest.approx(2 / 5)
    assert summary["tie_or_unparsable_rate"] == pytest.approx(2 / 5)
    assert summary["unparsable_rate"] == pytest.approx(4 / 15)  # 1 + 3 of 15 answers
    assert summary["prompts"] == 2 and summary["pairs"] == 5
    assert summary["per_category"] == {"animals": {"pairs": 3, "accuracy": pytest.approx(1 / 3)},
                                       "cars": {"pairs": 2, "accuracy": pytest.approx(1 / 2)}}
    assert summary["contradiction_rate"] is None  # no listener


def test_anchor_scores_rank_every_pair_and_equal_scores_tie():
    # Ranks 1, 3, 2; anchor 0. p(image 1 over anchor) = 0.2, p(image 2 over anchor) = 0.4.
    scores = anchor_scores([None, 0.2, 0.4], anchor=0)
    assert scores == [0.5, 0.2, 0.4]
    rows = rows_from_scores("p", [1, 3, 2], scores, ["p:0-1", "p:0-2", "p:1-2"])
    # (0,1) gold 1: 0.5 > 0.2 right, p = 0.5/0.7; (0,2) gold 1: 0.5 > 0.4 right, p = 0.5/0.9;
    # (1,2) gold 2 (rank 2 beats rank 3): 0.4 > 0.2 right, p = 0.4/0.6
    assert [(r.gold, r.predicted, r.correct) for r in rows] == [(1, 1, True), (1, 1, True), (2, 2, True)]
    assert [r.p_preferred for r in rows] == pytest.approx([5 / 7, 5 / 9, 2 / 3])
    tied = rows_from_scores("p", [1, 3, 2], anchor_scores([None, 0.5, None], 0), ["x", "y", "z"])
    # scores 0.5, 0.5, 0.5 (None is no evidence): every pair ties, every pair is wrong
    assert [r.predicted for r in tied] == [None, None, None] and summarize(tied)["accuracy"] == 0.0


# ---------------------------------------------------------------- judging rollouts


def _group(ranks, group_id="g") -> RankedGroup:
    images = tuple(Image.new("RGB", (8, 8), (30 * k, 0, 0)) for k in range(len(ranks)))
    return RankedGroup(group_id=group_id, prompt_id=group_id, prompt="a prompt", category="cat", images=images,
                       ranks=tuple(ranks))


def _rollout(pair, texts) -> RolloutGroup:
    completions = tuple(
        Completion(pair_id=pair.pair_id, completion_index=k, policy_version=0, token_ids=np.zeros(1, np.int64),
                   logprobs=np.zeros(1, np.float32), text=text, finish_reason="stop")
        for k, text in enumerate(texts))
    return RolloutGroup(pair=pair, prompt_token_ids=np.zeros(1, np.int64), completions=completions,
                        policy_version=0)


def test_pairwise_rows_vote_and_count_listener_contradictions():
    group = _group([1, 2])  # one pair, gold: the image that was index 0
    (comparison,) = pairwise_comparisons([group], seed=0)
    gold = comparison.pair.preferred
    texts = [format_target("r", gold), format_target("r", gold), "no answer here"]
    rollouts = {comparison.pair.pair_id: _rollout(comparison.pair, texts)}
    # Listener: completion 0 agrees (p_preferred 0.9); completion 1 prefers the other image (0.2) -> a
    # contradiction of an answer naming the gold image; completion 2 did not parse -> not judged.
    scores = {(comparison.pair.pair_id, k): ListenerScore(comparison.pair.pair_id, k, p_image_1=0.0,
                                                          p_preferred=p)
              for k, p in enumerate([0.9, 0.2, 0.7])}
    (row,) = pairwise_rows([comparison], rollouts, scores)
    assert (row.gold, row.predicted, row.correct) == (gold, gold, True)
    assert row.p_preferred == pytest.approx(2 / 3) and row.unparsable == 1 and row.samples == 3
    assert (row.contradictions, row.listened) == (1, 2)
    stats = comparison_stats([comparison], rollouts, scores)
    assert stats == {"comparisons": 1, "completions": 3, "unparsable_rate": pytest.approx(1 / 3),
                     "contradiction_rate": 0.5}


def test_anchor_rows_from_votes_against_the_anchor():
    group = _group([2, 1, 3])  # anchor is image 0 (rank 2); image 1 is best, image 2 worst
    comparisons = anchor_comparisons([group], seed=0)
    assert len(comparisons) == 2  # n - 1 comparisons
    rollouts = {}
    for c in comparisons:
        k = c.first if c.first != 0 else c.second
        position_of_k = 1 if c.first == k else 2
        # The reasoner prefers image 1 over the anchor 3 times of 4, and the anchor over image 2 always.
        answers = [position_of_k] * 3 + [3 - position_of_k] if k == 1 else [3 - position_of_k] * 4
        rollouts[c.pair.pair_id] = _rollout(c.pair, [format_target("r", a) for a in answers])
    rows = anchor_rows([group], comparisons, rollouts)
    # scores: anchor 0.5, image 1 0.75, image 2 0.0; pairs (0,1) gold 2: 0.75 > 0.5 right;
    # (0,2) gold 1: 0.5 > 0 right; (1,2) gold 1: 0.75 > 0 right.
    assert [(r.pair_id, r.gold, r.predicted) for r in rows] == [("g:0-1", 2, 2), ("g:0-2", 1, 1), ("g:1-2", 1, 1)]
    assert [r.p_preferred for r in rows] == pytest.approx([0.75 / 1.25, 1.0, 1.0])


def test_report_metrics_are_flat_and_recountable():
    rows = [PairRow("a:0-1", "a", 1, 1, 1.0, True, "x"), PairRow("a:0-2", "a", 2, None, 0.0, False, "x")]
    summary = summarize(rows)
    summary.update(skipped_rows={"tie": 3}, options={"model": "m"})
    metrics = report_metrics({"summary": summary, "pairs": [r.to_dict() for r in rows]})
    assert metrics["eval/accuracy"] == 0.5 and metrics["eval/category/x"] == 0.5
    assert metrics["data/skipped_tie"] == 3.0 and metrics["data/skipped_empty_prompt"] == 0.0
    assert "eval/contradiction_rate" not in metrics  # None without a listener
