"""The listener experiment's statistics (pure): its endpoint, paired differences with bootstrap intervals,
and the agreement split pooled over completions. docs/listener.md has the design they implement.

    endpoint(curve)                 mean of the last `ENDPOINT_EVALS` evaluations of one run
    paired_difference(a, b)         per-seed a - b, their mean and a percentile bootstrap interval over seeds
    experiment_verdict(contrasts)   the design's rule over the two primary contrasts: shown / negative / null
    agreement_split(rows)           accuracy when a listener agrees with the answer vs contradicts it

Run the tests: `.venv/bin/python -m pytest tests/unit/test_learning_stats.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

ENDPOINT_EVALS = 4  # the primary endpoint averages the last 4 evaluations of a run
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
MIN_SEEDS = 2  # a verdict needs at least two paired seeds (one gives a zero-width interval)


def endpoint(values_by_step: dict[int, float], last: int = ENDPOINT_EVALS) -> float:
    """Mean of the values at the `last` largest steps (NaN values count as missing; NaN when none)."""
    steps = sorted(values_by_step)[-last:]
    values = [values_by_step[s] for s in steps if values_by_step[s] is not None and not np.isnan(values_by_step[s])]
    return float(np.mean(values)) if values else float("nan")


def bootstrap_interval(values_S: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values_S` (resampling the S values with replacement)."""
    v_S = np.asarray(values_S, dtype=np.float64)
    if v_S.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means_R = v_S[rng.integers(0, v_S.size, size=(resamples, v_S.size))].mean(axis=1)  # [R]
    tail = (1.0 - confidence) / 2
    return float(np.quantile(means_R, tail)), float(np.quantile(means_R, 1.0 - tail))


def t_interval(values_S: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of `values_S` (S - 1 degrees of freedom). Not the design's interval: a
    sensitivity check, since a percentile bootstrap over 5 seeds has only 126 distinct resamples and is
    about 0.63x as wide as this one."""
    from scipy.stats import t

    v_S = np.asarray(values_S, dtype=np.float64)
    if v_S.size < 2:
        return float("nan"), float("nan")
    half = t.ppf(0.5 + confidence / 2, v_S.size - 1) * v_S.std(ddof=1) / np.sqrt(v_S.size)
    return float(v_S.mean() - half), float(v_S.mean() + half)


def paired_difference(a_by_seed: dict[int, float], b_by_seed: dict[int, float], **bootstrap) -> dict:
    """a - b on the seeds both have: per seed, the mean, the bootstrap interval and a verdict
    ('positive' / 'negative' when the interval excludes 0 on that side, else 'null'; none below MIN_SEEDS)."""
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    diffs = [a_by_seed[s] - b_by_seed[s] for s in seeds]
    low, high = bootstrap_interval(diffs, **bootstrap)
    verdict = "positive" if low > 0 else "negative" if high < 0 else "null"
    if len(diffs) < MIN_SEEDS:
        verdict = "none" if not diffs else f"too few seeds ({len(diffs)})"
    return {"seeds": seeds, "per_seed": diffs, "mean": float(np.mean(diffs)) if diffs else float("nan"),
            "ci95": [low, high], "verdict": verdict, "t_ci95": list(t_interval(diffs))}


PRIMARY_CONTRASTS = ("on - off", "on - placebo")


def experiment_verdict(contrasts: dict[str, dict]) -> str:
    """docs/listener.md's rule: the effect is 'shown' when both primary contrasts' intervals exclude 0 with a
    positive mean, 'negative' when either interval lies below 0, else 'null'; 'incomplete' without both."""
    verdicts = [contrasts[name]["verdict"] if name in contrasts else "none" for name in PRIMARY_CONTRASTS]
    if any(v not in ("positive", "negative", "null") for v in verdicts):
        return "incomplete"
    if "negative" in verdicts:
        return "negative"
    return "shown" if all(v == "positive" for v in verdicts) else "null"


def agreement_split(rows: Iterable[tuple[int | None, float | None, int]]) -> dict[str, float]:
    """Over (answer, listener p(preferred) or None when unusable, preferred) of each evaluated completion,
    pooled: the counts and the accuracy when the listener agrees with the answer vs contradicts it.

    A row is judged when it has an answer and a usable p; the listener's choice is the preferred image when
    p > 0.5, the other when p < 0.5, none on a tie (neither agree nor contradict), as in
    `pipeline.rewards.agreement_metrics`, which this pools with counts kept so runs can be summed.
    """
    judged = agree = contradict = agree_right = contradict_right = 0
    for answer, p, preferred in rows:
        if answer is None or p is None or np.isnan(p):
            continue
        judged += 1
        if p == 0.5:
            continue
        choice = preferred if p > 0.5 else 3 - preferred
        right = answer == preferred
        if choice == answer:
            agree, agree_right = agree + 1, agree_right + right
        else:
            contradict, contradict_right = contradict + 1, contradict_right + right
    nan = float("nan")
    return {"judged": judged, "agree": agree, "contradict": contradict,
            "agree_rate": agree / judged if judged else nan,
            "contradiction_rate": contradict / judged if judged else nan,
            "accuracy_when_agree": agree_right / agree if agree else nan,
            "accuracy_when_contradict": contradict_right / contradict if contradict else nan}
