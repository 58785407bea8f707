"""bench/learning_stats.py: the listener experiment's endpoint, paired bootstrap intervals and the pooled
agreement split (docs/listener.md), with values worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.learning_report import pooled_split
from bench.learning_stats import agreement_split, bootstrap_interval, endpoint, paired_difference


def test_endpoint_averages_the_last_four_evaluations() -> None:
    curve = {0: 0.1, 4: 0.2, 8: 0.4, 12: 0.5, 16: 0.6, 20: 0.7, 24: 0.8}
    assert endpoint(curve) == pytest.approx((0.5 + 0.6 + 0.7 + 0.8) / 4)
    assert endpoint({24: 0.8, 0: 0.1, 20: 0.6}, last=2) == pytest.approx(0.7)  # by step, not by order given
    assert endpoint({12: float("nan"), 16: 0.5, 20: 0.7, 24: 0.9}) == pytest.approx(0.7)  # NaN is missing
    assert math.isnan(endpoint({}))


def test_bootstrap_interval_of_constant_values_is_the_value_and_widens_with_spread() -> None:
    assert bootstrap_interval([0.2] * 5) == pytest.approx((0.2, 0.2))
    low, high = bootstrap_interval([0.0, 0.1, 0.2, 0.3, 0.4])
    assert low < 0.2 < high and low >= 0.0 and high <= 0.4
    # with 2 values the resampled means are 0 (1/4), 0.5 (1/2) or 1 (1/4): the 95% interval is [0, 1]
    assert bootstrap_interval([0.0, 1.0]) == pytest.approx((0.0, 1.0))
    assert bootstrap_interval([0.0, 1.0], confidence=0.4) == pytest.approx((0.5, 0.5))


def test_paired_difference_is_per_seed_with_a_verdict() -> None:
    on = {0: 0.9, 1: 0.8, 2: 0.7}
    off = {0: 0.5, 1: 0.6, 2: 0.6, 3: 0.1}  # seed 3 has no pair: left out
    d = paired_difference(on, off)
    assert d["seeds"] == [0, 1, 2] and d["per_seed"] == pytest.approx([0.4, 0.2, 0.1])
    assert d["mean"] == pytest.approx(0.7 / 3) and d["verdict"] == "positive"
    assert 0.1 - 1e-9 <= d["ci95"][0] < d["mean"] < d["ci95"][1] <= 0.4 + 1e-9
    assert paired_difference(off, on)["verdict"] == "negative"
    assert paired_difference({0: 0.5, 1: 0.7}, {0: 0.6, 1: 0.6})["verdict"] == "null"  # -0.1, +0.1
    assert paired_difference({}, off)["verdict"] == "none"
    one = paired_difference({0: 0.9}, {0: 0.5})  # one seed: a zero-width interval, no verdict
    assert one["ci95"] == pytest.approx([0.4, 0.4]) and one["verdict"] == "too few seeds (1)"


def test_agreement_split_by_hand() -> None:
    rows = [(2, 0.9, 2),   # listener prefers 2, answer 2: agrees, right
            (1, 0.2, 2),   # prefers 1 (p(preferred=2) .2), answer 1: agrees, wrong
            (1, 0.7, 2),   # prefers 2, answer 1: contradicts, wrong
            (2, 0.3, 2),   # prefers 1, answer 2: contradicts, right
            (1, 0.6, 1),   # prefers 1, answer 1: agrees, right
            (2, 0.5, 2),   # a tie: judged, neither
            (None, 0.9, 2),  # no answer: not judged
            (2, None, 2)]  # no usable score: not judged
    s = agreement_split(rows)
    assert (s["judged"], s["agree"], s["contradict"]) == (6, 3, 2)
    assert s["agree_rate"] == pytest.approx(0.5) and s["contradiction_rate"] == pytest.approx(2 / 6)
    assert s["accuracy_when_agree"] == pytest.approx(2 / 3)
    assert s["accuracy_when_contradict"] == pytest.approx(0.5)
    empty = agreement_split([])
    assert empty["judged"] == 0 and np.isnan(empty["accuracy_when_agree"])


def test_pooled_split_sums_the_counts_of_runs() -> None:
    a = agreement_split([(2, 0.9, 2), (1, 0.7, 2)])  # agree right, contradict wrong
    b = agreement_split([(2, 0.9, 2), (2, 0.8, 2), (2, 0.3, 2)])  # agree right x2, contradict right
    pooled = pooled_split([a, b])
    assert (pooled["judged"], pooled["agree"], pooled["contradict"]) == (5, 3, 2)
    assert pooled["accuracy_when_agree"] == pytest.approx(1.0)
    assert pooled["accuracy_when_contradict"] == pytest.approx(0.5)
    assert pooled == pytest.approx(agreement_split([(2, 0.9, 2), (1, 0.7, 2), (2, 0.9, 2), (2, 0.8, 2),
                                                    (2, 0.3, 2)]))


def test_t_interval_by_hand() -> None:
    from bench.learning_stats import t_interval

    # mean 0.2, sample std 0.1 over 3 values, t(2) 0.975 quantile 4.3027: half-width 4.3027 * 0.1 / sqrt(3)
    low, high = t_interval([0.1, 0.2, 0.3])
    assert (low, high) == pytest.approx((0.2 - 0.248417, 0.2 + 0.248417), abs=1e-5)
    assert all(math.isnan(x) for x in t_interval([0.4]))


def test_experiment_verdict_applies_the_design_rule_to_both_primary_contrasts() -> None:
    from bench.learning_stats import experiment_verdict

    def c(verdict: str) -> dict:
        return {"verdict": verdict}

    assert experiment_verdict({"on - off": c("positive"), "on - placebo": c("positive")}) == "shown"
    assert experiment_verdict({"on - off": c("positive"), "on - placebo": c("null")}) == "null"
    assert experiment_verdict({"on - off": c("null"), "on - placebo": c("negative")}) == "negative"
    assert experiment_verdict({"on - off": c("positive"), "on - oracle": c("positive")}) == "incomplete"
    assert experiment_verdict({"on - off": c("too few seeds (1)"), "on - placebo": c("positive")}) == "incomplete"
