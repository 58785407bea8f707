"""pipeline/rewards.py: each component, the weighted sum, contradictions, the filter and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.prompts import format_target
from pipeline.rewards import (
    accuracy_reward,
    brier_score,
    completion_reward,
    expected_calibration_error,
    format_reward,
    has_reward_variance,
    is_contradiction,
    listener_choice,
    listener_reward,
    p_image_1,
    total_reward,
)
from pipeline.types import Completion, ListenerScore

FAST = settings(max_examples=25, deadline=None)
GOOD_1 = format_target("Image 1 has the red cube the prompt asks for.", 1)
GOOD_2 = format_target("The second one is sharper.", 2)
BAD = "<answer>1</answer>"  # no reasoning block


def completion(text: str, index: int = 0, pair_id: str = "p") -> Completion:
    return Completion(pair_id=pair_id, completion_index=index, policy_version=0,
                      token_ids=np.zeros(3, np.int64), logprobs=np.zeros(3, np.float32), text=text,
                      finish_reason="stop")


def score(p_preferred: float, preferred: int = 1, usable: bool = True, index: int = 0) -> ListenerScore:
    return ListenerScore(pair_id="p", completion_index=index, p_image_1=p_image_1(p_preferred, preferred),
                         p_preferred=p_preferred, usable=usable)


def test_components():
    assert (format_reward(1), format_reward(None)) == (1.0, 0.0)
    assert (accuracy_reward(1, 1), accuracy_reward(2, 1), accuracy_reward(None, 1)) == (1.0, 0.0, 0.0)
    assert listener_reward(0.8, well_formed=True) == 0.8
    assert listener_reward(0.8, well_formed=True, center=True) == pytest.approx(0.3)
    assert listener_reward(0.8, well_formed=False) == 0.0
    assert listener_reward(0.8, well_formed=False, center=True) == 0.0


def test_total_reward_weights():
    # defaults (1, .5, .5): 1 + .5 * 1 + .5 * .8 = 1.9; custom (2, 1, 0): 2 + 1 = 3
    assert total_reward(1.0, 1.0, 0.8) == pytest.approx(1.9)
    assert total_reward(1.0, 1.0, 0.8, w_format=2.0, w_accuracy=1.0, w_listener=0.0) == pytest.approx(3.0)


@pytest.mark.parametrize("text, p, center, expected", [
    (GOOD_1, 0.8, False, (1, 1.0, 1.0, 0.8, 1.0 + 0.5 + 0.4)),  # right, listener .8 -> 1.9
    (GOOD_1, 0.8, True, (1, 1.0, 1.0, 0.3, 1.0 + 0.5 + 0.15)),  # centred: .8 - .5 = .3 -> 1.65
    (GOOD_2, 0.3, False, (2, 1.0, 0.0, 0.3, 1.0 + 0.0 + 0.15)),  # wrong answer -> 1.15
    (BAD, 0.9, False, (None, 0.0, 0.0, 0.0, 0.0)),  # bad format: no accuracy, no listener credit
])
def test_completion_reward_by_hand(text, p, center, expected):
    r = completion_reward(completion(text), preferred=1, score=score(p), center_listener=center)
    assert (r.r_format, r.r_accuracy, r.r_listener, r.total) == pytest.approx(expected[1:])
    assert r.answer == expected[0] and r.listener_p_preferred == p
    assert (r.pair_id, r.completion_index) == ("p", 0)


def test_completion_reward_without_listener():
    # listener off: r_listener 0, p NaN, never a contradiction; 1 + .5 * 1 = 1.5
    r = completion_reward(completion(GOOD_1), preferred=1, score=None)
    assert (r.r_listener, r.total, r.contradiction) == (0.0, 1.5, False)
    assert math.isnan(r.listener_p_preferred)


def test_unusable_score_keeps_defined_half():
    r = completion_reward(completion(GOOD_1), preferred=1, score=score(0.5, usable=False))
    assert r.r_listener == 0.5 and not r.contradiction


def test_completion_reward_rejects_a_foreign_score():
    with pytest.raises(ValueError, match="does not belong"):
        completion_reward(completion(GOOD_1, index=1), preferred=1, score=score(0.5, index=0))


def test_listener_choice():
    # preferred 1: p(image 1) = p_preferred; preferred 2: p(image 1) = 1 - p_preferred
    assert listener_choice(0.8, preferred=1) == 1
    assert listener_choice(0.8, preferred=2) == 2
    assert listener_choice(0.3, preferred=1) == 2
    assert listener_choice(0.5, preferred=2) is None
    assert p_image_1(0.8, 2) == pytest.approx(0.2)


@pytest.mark.parametrize("answer, p_preferred, preferred, usable, expected", [
    (1, 0.3, 1, True, True),  # listener p(image 1) = .3: prefers 2, reasoner said 1
    (2, 0.3, 1, True, False),  # both prefer 2
    (2, 0.9, 2, True, False),  # both prefer the preferred image 2
    (1, 0.9, 2, True, True),  # listener prefers 2 (the preferred), reasoner said 1
    (1, 0.5, 1, True, False),  # tie: not a contradiction
    (1, 0.1, 1, False, False),  # unusable score: not a contradiction
    (None, 0.1, 1, True, False),  # bad format: no answer to contradict
])
def test_contradiction(answer, p_preferred, preferred, usable, expected):
    s = score(p_preferred, preferred=preferred, usable=usable)
    assert is_contradiction(answer, s, preferred) is expected
    assert is_contradiction(answer, None, preferred) is False


def test_zero_variance_filter():
    assert not has_reward_variance([1.5, 1.5, 1.5])
    assert not has_reward_variance([])
    assert has_reward_variance([1.5, 1.5, 1.0])


def test_brier_by_hand():
    # ((.8 - 1)^2 + (.4 - 0)^2) / 2 = (.04 + .16) / 2 = .1
    assert brier_score([0.8, 0.4], [1, 0]) == pytest.approx(0.1)
    assert math.isnan(brier_score([], []))


def test_ece_by_hand():
    # 10 bins: [0, .1) holds .05 (y 0): |.05 - 0| * 1/4; [.1, .2) holds .15 (y 1): .85 * 1/4;
    # [.9, 1] holds .95 and 1.0 (y 1, 0): |.975 - .5| * 2/4 -> .0125 + .2125 + .2375 = .4625
    assert expected_calibration_error([0.05, 0.15, 0.95, 1.0], [0, 1, 1, 0]) == pytest.approx(0.4625)
    # 2 bins: [0, .5) holds .05, .15 (mean .1, y .5): .4 * 2/4; [.5, 1] holds .95, 1.0: .475 * 2/4
    assert expected_calibration_error([0.05, 0.15, 0.95, 1.0], [0, 1, 1, 0], num_bins=2) == pytest.approx(0.4375)
    assert math.isnan(expected_calibration_error([], []))


def test_calibration_input_errors():
    with pytest.raises(ValueError, match="equal length"):
        brier_score([0.5], [1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error([0.5], [1], num_bins=0)


@FAST
@given(probs=st.lists(st.floats(0, 1), min_size=1, max_size=30), data=st.data())
def test_property_calibration_bounds(probs, data):
    outcomes = data.draw(st.lists(st.integers(0, 1), min_size=len(probs), max_size=len(probs)))
    assert 0.0 <= expected_calibration_error(probs, outcomes) <= 1.0 + 1e-12
    assert 0.0 <= brier_score(probs, outcomes) <= 1.0
    # a forecaster that is always right and certain is perfectly calibrated
    assert expected_calibration_error([float(y) for y in outcomes], outcomes) == 0.0
    assert brier_score([float(y) for y in outcomes], outcomes) == 0.0
