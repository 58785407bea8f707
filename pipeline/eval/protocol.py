"""Evaluation protocol math (pure): ImageReward pairs, majority vote, accuracy, anchor ranking, contradictions.

The ImageReward protocol (Xu et al., 2023; docs/method.md "Data and evaluation"): for each prompt, every pair of
its images whose human ranks differ is one test pair (rank 1 is the best image; equal ranks make no pair);
accuracy is the fraction of those pairs on which the model prefers the image people ranked better. A tie in
the model's prediction (equal votes, equal scores) or an unparsable answer counts as wrong.

Departure from ImageReward's scalar-score setup: our reasoner compares two images directly, so a pair's
prediction is the majority vote of n sampled answers (greedy: n = 1), and `p_preferred` is the fraction of
those n answers naming the human-preferred image (unparsable answers count in the denominator). With
`anchor` ranking, each image of a prompt is compared once with one anchor image (n-1 comparisons) and the
pairwise probabilities become scores (docs/method.md "At inference").

Everything here works on plain Python values, so a report's per-pair rows can be recounted by anyone:
`summarize(rows)["accuracy"] == mean(row.correct)`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from pipeline.data.formats import imagereward_pairs  # noqa: F401  (the pair rule lives with the data)

Answer = int | None  # 1, 2, or None when the completion did not parse


@dataclass(frozen=True)
class Vote:
    """The majority vote over one pair's n answers."""

    predicted: Answer  # None: a tie between the images, or no answer parsed
    votes_1: int
    votes_2: int
    unparsable: int

    @property
    def n(self) -> int:
        return self.votes_1 + self.votes_2 + self.unparsable


def majority_vote(answers: Sequence[Answer]) -> Vote:
    """The image named by most answers; equal counts (including 0-0) predict nothing."""
    votes_1 = sum(1 for a in answers if a == 1)
    votes_2 = sum(1 for a in answers if a == 2)
    unparsable = len(answers) - votes_1 - votes_2
    predicted = 1 if votes_1 > votes_2 else 2 if votes_2 > votes_1 else None
    return Vote(predicted=predicted, votes_1=votes_1, votes_2=votes_2, unparsable=unparsable)


@dataclass(frozen=True)
class PairRow:
    """One evaluated pair, as written to the report; enough to recount every summary number."""

    pair_id: str
    prompt_id: str
    gold: int  # the human-preferred image, as the pair was shown (1 or 2)
    predicted: Answer  # None: tie or unparsable -> wrong
    p_preferred: float  # the model's probability of the gold image (vote fraction, or anchor scores)
    correct: bool
    category: str = ""
    unparsable: int = 0  # answers that did not parse (of `samples`)
    samples: int = 1
    contradictions: int = 0  # answers the listener disagreed with (`pipeline.rewards.is_contradiction`)
    listened: int = 0  # answers the listener judged (parsed, with a usable score)
    failed: str = ""  # why no prediction could be made ("unparsable", "prompt_too_long"); "" when one was
    votes_gold: float | None = None  # human votes for the gold image, where the dataset counts them
    votes_other: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def row_from_answers(pair_id: str, prompt_id: str, gold: int, answers: Sequence[Answer],
                     category: str = "") -> PairRow:
    """A pair's row from its n parsed answers (majority vote; tie or unparsable is wrong)."""
    vote = majority_vote(answers)
    votes_gold = vote.votes_1 if gold == 1 else vote.votes_2
    return PairRow(
        pair_id=pair_id, prompt_id=prompt_id, gold=gold, predicted=vote.predicted,
        p_preferred=votes_gold / vote.n if vote.n else 0.0,
        correct=vote.predicted == gold, category=category, unparsable=vote.unparsable, samples=vote.n,
        failed="unparsable" if vote.n and vote.unparsable == vote.n else "",
    )


def summarize(rows: Sequence[PairRow]) -> dict:
    """Accuracy (ties and unparsable wrong), unparsable and tie rates, contradiction rate, per category."""
    n = len(rows)
    samples = sum(r.samples for r in rows)
    listened = sum(r.listened for r in rows)
    by_category: dict[str, list[PairRow]] = defaultdict(list)
    for r in rows:
        if r.category:
            by_category[r.category].append(r)
    return {
        "pairs": n,
        "prompts": len({r.prompt_id for r in rows}),
        "accuracy": sum(r.correct for r in rows) / n if n else 0.0,
        "tie_or_unparsable_rate": sum(r.predicted is None for r in rows) / n if n else 0.0,
        "unparsable_rate": sum(r.unparsable for r in rows) / samples if samples else 0.0,
        "contradiction_rate": sum(r.contradictions for r in rows) / listened if listened else None,
        "per_category": {
            name: {"pairs": len(rs), "accuracy": sum(r.correct for r in rs) / len(rs)}
            for name, rs in sorted(by_category.items())
        },
    }


def anchor_scores(p_over_anchor: Sequence[float | None], anchor: int) -> list[float | None]:
    """Scores of a prompt's n images from n-1 comparisons with image `anchor`.

    `p_over_anchor[k]` is p(image k preferred over the anchor) (ignored at `anchor`, which scores 0.5
    against itself). None, a failed comparison (no answer parsed, or the prompt did not fit the engine),
    stays None: that image has no score, and every pair it is in gets no prediction, hence is wrong, as a
    pair with no parsed answer is in pairwise mode (one rule for a failed answer in both modes).
    """
    return [0.5 if k == anchor else None if p is None else float(p) for k, p in enumerate(p_over_anchor)]


def rows_from_scores(prompt_id: str, ranks: Sequence[int], scores: Sequence[float | None], pair_ids: Sequence[str],
                     category: str = "") -> list[PairRow]:
    """ImageReward pairs of one prompt judged by per-image scores; equal scores are a tie (wrong), and so is
    a pair with an unscored image (`failed` "unparsable": its comparison gave no answer).

    `pair_ids` follow `imagereward_pairs(ranks)`; gold is in that order (1: image i). p_preferred =
    s_gold / (s_i + s_j) (0.5 when both are 0; 0.0 without both scores, as a pair with no parsed answer).
    """
    rows = []
    for (i, j, gold), pair_id in zip(imagereward_pairs(ranks), pair_ids, strict=True):
        s_i, s_j = scores[i], scores[j]
        if s_i is None or s_j is None:
            rows.append(PairRow(pair_id=pair_id, prompt_id=prompt_id, gold=gold, predicted=None, p_preferred=0.0,
                                correct=False, category=category, samples=0, failed="unparsable"))
            continue
        predicted = 1 if s_i > s_j else 2 if s_j > s_i else None
        total = s_i + s_j
        s_gold = s_i if gold == 1 else s_j
        rows.append(PairRow(pair_id=pair_id, prompt_id=prompt_id, gold=gold, predicted=predicted,
                            p_preferred=s_gold / total if total > 0 else 0.5, correct=predicted == gold,
                            category=category, samples=0))  # judged by scores: no answers of its own
    return rows
