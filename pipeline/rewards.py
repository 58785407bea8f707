"""Rewards of one completion, the zero-variance group filter, and the listener's calibration (pure).

    r = w_format * r_format + w_accuracy * r_accuracy + w_listener * r_listener     (defaults 1, 0.5, 0.5)

- r_format: 1 when `pipeline.prompts.parse_completion` accepts the completion, else 0. A bad format earns
  no accuracy and no listener credit (docs/method.md).
- r_accuracy: 1 when the parsed answer is the human-preferred image, else 0.
- r_listener: the listener's p(preferred image) given the masked reasoning, or p - 0.5 when centred. A
  well-formed completion whose reasoning is empty after masking (an unusable score: the reasoning was
  only a verdict) gets no listener credit: it is scored as p = 0, the least any real score can give
  (0, or -0.5 centred), so saying nothing never beats a reasoning the listener doubts. With no listener
  score at all (listener off, w_listener = 0) it is 0.
- Contradiction: the listener prefers image k when p(image k) > 0.5; a completion contradicts when its
  parsed answer names the other image, agrees when it names the same. Ties (p = 0.5), bad formats,
  unusable or missing scores are neither (`agreement_metrics`: accuracy and rate of each, the paper's
  agreement analysis, shared by the training metrics and `pipeline.eval.command`).
- Answer leak: a well-formed completion whose masked reasoning still has a verdict naming its answer
  (`pipeline.prompts.answer_leaks`); `listener/answer_leak_rate` is their fraction of the well-formed
  completions with a non-empty masked reasoning.
- Calibration of the listener: the event "image 1 is preferred" with the listener's p(image 1) as its
  forecast (derived from p_preferred and the label). Brier score = mean (p - y)^2, which equals
  mean (1 - p_preferred)^2; ECE uses `num_bins` equal-width bins on [0, 1] (the last one closed):
  sum over bins of (bin count / N) * |mean forecast - mean outcome|.
- The listener term's controls (`reward.listener_signal`, docs/listener.md): `oracle` replaces the listener's
  p by `faithfulness`, the fraction of the two images the masked reasoning describes as they are ("Image k
  shows a C S", first sentence per image; a missing one counts as unfaithful), e.g. both right 1, one 0.5;
  `placebo` by `placebo_p`, the usable scores' p(preferred) permuted across the step's completions by a
  seeded shuffle (the same values, none of them about its completion). A bad format earns neither.
- `reward_metrics`: the step's means of each component, format rate, accuracy, agreement analysis,
  answer leak rate and calibration, for the reward aggregator (`actors/reward.py`).

Run the tests: `.venv/bin/python -m pytest tests/unit/test_rewards.py`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.prompts import answer_leaks, mask_answer, parse_completion
from pipeline.types import Completion, CompletionReward, ImageIndex, ListenerScore, RolloutGroup

ScoreKey = tuple[str, int]  # (pair_id, completion_index): how a listener score joins its completion
NO_CREDIT_P = 0.0  # the p(preferred) an unusable score (no reasoning left after masking) is rewarded as
_DESCRIPTION_RE = re.compile(r"\bImage ([12]) shows an? ([a-z]+ [a-z]+)\b")


def described_images(reasoning: str) -> dict[ImageIndex, str]:
    """What the reasoning says each image shows: {k: "red circle"} from its first "Image k shows a C S"."""
    found: dict[ImageIndex, str] = {}
    for match in _DESCRIPTION_RE.finditer(reasoning):
        found.setdefault(1 if match.group(1) == "1" else 2, match.group(2))
    return found


def faithfulness(reasoning: str, truth: tuple[str, str]) -> float:
    """The fraction of the two images whose description in `reasoning` is `truth` (image 1's, image 2's)."""
    said = described_images(reasoning)
    return (float(said.get(1) == truth[0]) + float(said.get(2) == truth[1])) / 2


def placebo_p(scores: Sequence[ListenerScore], key: str) -> dict[ScoreKey, float]:
    """The usable scores' p(preferred), permuted among them by a shuffle seeded by `key`: what each
    completion's listener term reads in the placebo arm (unusable scores keep no credit, not listed)."""
    usable = sorted((s for s in scores if s.usable), key=lambda s: (s.pair_id, s.completion_index))
    values = [s.p_preferred for s in usable]
    random.Random(f"placebo:{key}").shuffle(values)
    return {(s.pair_id, s.completion_index): v for s, v in zip(usable, values)}


def format_reward(answer: ImageIndex | None) -> float:
    """1 for a well-formed completion (the strict parse found an answer), else 0."""
    return 1.0 if answer is not None else 0.0


def accuracy_reward(answer: ImageIndex | None, preferred: ImageIndex) -> float:
    """1 when the parsed answer is the preferred image; a bad format (None) is never right."""
    return 1.0 if answer is not None and answer == preferred else 0.0


def listener_reward(p_preferred: float, well_formed: bool, center: bool = False, usable: bool = True) -> float:
    """The listener's p(preferred), or p - 0.5 when centred; 0 for a bad format. An unusable score (no
    reasoning left after masking) earns no credit: it is rewarded as p = `NO_CREDIT_P`, whatever p it carries."""
    if not well_formed:
        return 0.0
    p = p_preferred if usable else NO_CREDIT_P
    return p - 0.5 if center else p


def total_reward(
    r_format: float,
    r_accuracy: float,
    r_listener: float,
    *,
    w_format: float = 1.0,
    w_accuracy: float = 0.5,
    w_listener: float = 0.5,
) -> float:
    """The weighted sum of the three components (the paper's weights by default)."""
    return w_format * r_format + w_accuracy * r_accuracy + w_listener * r_listener


def p_image_1(p_preferred: float, preferred: ImageIndex) -> float:
    """The listener's p(image 1), from its p(preferred) and the label."""
    return p_preferred if preferred == 1 else 1.0 - p_preferred


def listener_choice(p_preferred: float, preferred: ImageIndex) -> ImageIndex | None:
    """The image the listener prefers: k when p(image k) > 0.5; None on a tie."""
    p1 = p_image_1(p_preferred, preferred)
    if p1 == 0.5:
        return None
    return 1 if p1 > 0.5 else 2


def is_contradiction(answer: ImageIndex | None, score: ListenerScore | None, preferred: ImageIndex) -> bool:
    """The listener, reading the masked reasoning, prefers the other image than the reasoner's answer."""
    if answer is None or score is None or not score.usable:
        return False
    choice = listener_choice(score.p_preferred, preferred)
    return choice is not None and choice != answer


def agreement_metrics(
    judged: Iterable[tuple[ImageIndex | None, ListenerScore | None, ImageIndex]],
) -> dict[str, float]:
    """The paper's agreement analysis over (answer, listener score, preferred) of each completion.

    Counted: completions with a parsed answer and a usable score (`judged`). Among them the reasoner agrees
    when the listener prefers the image it answered, contradicts when the listener prefers the other one
    (`is_contradiction`); a listener tie (p = 0.5) is neither, so agree_rate + contradiction_rate <= 1.
    accuracy_when_agree / _contradict: the fraction of those answers naming the preferred image. A rate
    or accuracy over an empty set is NaN.
    """
    n = 0
    agree: list[bool] = []  # per agreeing answer: was it right
    contradict: list[bool] = []
    for answer, score, preferred in judged:
        if answer is None or score is None or not score.usable:
            continue
        n += 1
        if is_contradiction(answer, score, preferred):
            contradict.append(answer == preferred)
        elif listener_choice(score.p_preferred, preferred) == answer:
            agree.append(answer == preferred)
    nan = float("nan")
    return {
        "judged": float(n),
        "agree_rate": len(agree) / n if n else nan,
        "contradiction_rate": len(contradict) / n if n else nan,
        "accuracy_when_agree": float(np.mean(agree)) if agree else nan,
        "accuracy_when_contradict": float(np.mean(contradict)) if contradict else nan,
    }


def answer_leak_rate(answers_and_texts: Iterable[tuple[ImageIndex | None, str]]) -> float:
    """The fraction of well-formed completions whose masked reasoning (what the listener reads) still has a
    verdict naming their answer (`pipeline.prompts.answer_leaks`); over those with a non-empty masked
    reasoning (the ones the listener reads), NaN when none."""
    leaks = [answer_leaks(masked, answer) for answer, text in answers_and_texts
             if answer is not None and (masked := mask_answer(text))]
    return float(np.mean(leaks)) if leaks else float("nan")


def completion_reward(
    completion: Completion,
    preferred: ImageIndex,
    score: ListenerScore | None,
    *,
    w_format: float = 1.0,
    w_accuracy: float = 0.5,
    w_listener: float = 0.5,
    center_listener: bool = False,
    listener_term: float | None = None,
) -> CompletionReward:
    """Every reward component of one completion. `score` None means no listener (its reward is 0).
    `listener_term`, when given, is the listener term of a well-formed completion instead of the score's
    (the oracle and placebo arms); contradiction is still the score's."""
    if score is not None and (score.pair_id, score.completion_index) != (
            completion.pair_id, completion.completion_index):
        raise ValueError(f"listener score ({score.pair_id}, {score.completion_index}) does not belong to "
                         f"completion ({completion.pair_id}, {completion.completion_index})")
    answer = parse_completion(completion.text).answer
    r_format = format_reward(answer)
    r_accuracy = accuracy_reward(answer, preferred)
    p_preferred = score.p_preferred if score is not None else float("nan")
    if listener_term is not None:
        r_listener = listener_term if answer is not None else 0.0
    else:
        r_listener = (listener_reward(p_preferred, answer is not None, center_listener, usable=score.usable)
                      if score is not None else 0.0)
    return CompletionReward(
        pair_id=completion.pair_id,
        completion_index=completion.completion_index,
        answer=answer,
        r_format=r_format,
        r_accuracy=r_accuracy,
        r_listener=r_listener,
        total=total_reward(r_format, r_accuracy, r_listener,
                           w_format=w_format, w_accuracy=w_accuracy, w_listener=w_listener),
        listener_p_preferred=p_preferred,
        contradiction=is_contradiction(answer, score, preferred),
    )


def has_reward_variance(totals: Sequence[float], atol: float = 1e-8) -> bool:
    """False when every reward of a group is the same: its advantages are all 0, nothing to learn."""
    return len(totals) > 0 and float(np.max(totals) - np.min(totals)) > atol


def brier_score(probs: Sequence[float], outcomes: Sequence[float]) -> float:
    """Mean squared error of probability forecasts against 0/1 outcomes; NaN when empty."""
    p_N, y_N = _as_arrays(probs, outcomes)
    return float(np.mean((p_N - y_N) ** 2)) if len(p_N) else float("nan")


def expected_calibration_error(probs: Sequence[float], outcomes: Sequence[float], num_bins: int = 10) -> float:
    """ECE over `num_bins` equal-width bins of [0, 1] (last bin closed); NaN when empty."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    p_N, y_N = _as_arrays(probs, outcomes)
    if not len(p_N):
        return float("nan")
    bin_N = np.minimum((p_N * num_bins).astype(np.int64), num_bins - 1)
    ece = 0.0
    for b in np.unique(bin_N):
        in_bin = bin_N == b
        ece += in_bin.mean() * abs(p_N[in_bin].mean() - y_N[in_bin].mean())
    return float(ece)


def reward_metrics(
    groups: Sequence[RolloutGroup],
    rewards: Sequence[Sequence[CompletionReward]],
    scores: dict[ScoreKey, ListenerScore],
) -> dict[str, float]:
    """Means of each reward component, format rate, accuracy, the listener's agreement, leaks and calibration.

    Agreement (`agreement_metrics`, listener/agree_rate, contradiction_rate, accuracy_when_agree,
    accuracy_when_contradict, judged): over well-formed completions with a usable listener score.
    Calibration: over every usable score (the listener is judged whatever the format). Answer leak rate:
    from the completions' texts, so it is defined with the listener off too. A metric over an empty set is
    NaN, so every key is present at every step (MLflow plots NaN as a gap).
    """
    nan = float("nan")
    flat = [r for group in rewards for r in group]
    totals = np.array([r.total for r in flat])
    metrics = {
        "reward/mean": float(totals.mean()),
        "reward/std": float(totals.std()),
        "reward/format": float(np.mean([r.r_format for r in flat])),
        "reward/accuracy": float(np.mean([r.r_accuracy for r in flat])),
        "reward/listener": float(np.mean([r.r_listener for r in flat])),
        "rollout/format_rate": float(np.mean([r.answer is not None for r in flat])),
    }
    well_formed = [r for r in flat if r.answer is not None]
    metrics["rollout/accuracy_well_formed"] = (
        float(np.mean([r.r_accuracy > 0 for r in well_formed])) if well_formed else nan)
    metrics["rollout/accuracy"] = float(np.mean([r.r_accuracy > 0 for r in flat]))
    usable = [(g.pair.preferred, s) for g in groups for c in g.completions
              if (s := scores.get((c.pair_id, c.completion_index))) is not None and s.usable]
    metrics.update({"listener/brier": nan, "listener/ece": nan, "listener/p_preferred": nan})
    if usable:
        probs = [p_image_1(s.p_preferred, preferred) for preferred, s in usable]
        outcomes = [float(preferred == 1) for preferred, _ in usable]
        metrics["listener/brier"] = brier_score(probs, outcomes)
        metrics["listener/ece"] = expected_calibration_error(probs, outcomes)
        metrics["listener/p_preferred"] = float(np.mean([s.p_preferred for _, s in usable]))
    agreement = agreement_metrics((r.answer, scores.get((r.pair_id, r.completion_index)), g.pair.preferred)
                                  for g, group_rewards in zip(groups, rewards, strict=True) for r in group_rewards)
    metrics.update({f"listener/{name}": value for name, value in agreement.items()})
    metrics["listener/answer_leak_rate"] = answer_leak_rate(
        (r.answer, c.text) for g, group_rewards in zip(groups, rewards, strict=True)
        for c, r in zip(g.completions, group_rewards, strict=True))
    metrics["listener/usable_rate"] = float(np.mean([s.usable for s in scores.values()])) if scores else nan
    return metrics


def _as_arrays(probs: Sequence[float], outcomes: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p_N = np.asarray(probs, dtype=np.float64)
    y_N = np.asarray(outcomes, dtype=np.float64)
    if p_N.shape != y_N.shape or p_N.ndim != 1:
        raise ValueError(f"probs and outcomes must be 1-D of equal length, got {p_N.shape} and {y_N.shape}")
    if len(p_N) and (p_N.min() < 0 or p_N.max() > 1):
        raise ValueError("probabilities must lie in [0, 1]")
    return p_N, y_N
