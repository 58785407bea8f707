"""pipeline/rewards.py: each component, the weighted sum, contradictions, agreement, leaks, the filter and
calibration; and actors/listener.py `make_score`, the listener's p(image 1) -> p(preferred) for both labels."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.listener import UNUSABLE_P, make_score
from pipeline.prompts import format_target
from pipeline.rewards import (
    accuracy_reward,
    agreement_metrics,
    answer_leak_rate,
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
from pipeline.synthetic import synthetic_pair
from pipeline.types import Completion, ListenerRequest, ListenerScore

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


def scored(p_image_1: float, p_preferred: float, usable: bool = True, index: int = 0) -> ListenerScore:
    """A score written out by hand: both probabilities literal, nothing derived by the code under test."""
    return ListenerScore(pair_id="p", completion_index=index, p_image_1=p_image_1, p_preferred=p_preferred,
                         usable=usable)


@pytest.mark.parametrize("text, preferred, p_image_1, p_preferred, expected", [
    # preferred 1: p(preferred) = p(image 1) = .8; answer 1 right -> 1 + .5 + .5 * .8 = 1.9
    (GOOD_1, 1, 0.8, 0.8, (1.0, 0.4 + 1.5, False)),
    # preferred 2, listener p(image 1) = .3, so p(image 2) = p(preferred) = .7; answer 2 right:
    # 1 + .5 + .5 * .7 = 1.85 (reading p(image 1) would give 1.65)
    (GOOD_2, 2, 0.3, 0.7, (1.0, 1.85, False)),
    # preferred 2, listener p(image 1) = .9 (p(preferred) .1); answer 1 wrong and agrees with the listener:
    # 1 + 0 + .5 * .1 = 1.05 (reading p(image 1) would give 1.45)
    (GOOD_1, 2, 0.9, 0.1, (0.0, 1.05, False)),
    # preferred 2, p(image 1) = .9; answer 2 right but the listener prefers image 1: a contradiction
    (GOOD_2, 2, 0.9, 0.1, (1.0, 1.55, True)),
    # preferred 1, p(image 1) = .2 (p(preferred) .2); answer 2 wrong, agrees with the listener: 1 + .1
    (GOOD_2, 1, 0.2, 0.2, (0.0, 1.1, False)),
])
def test_completion_reward_both_labels_by_hand(text, preferred, p_image_1, p_preferred, expected):
    r = completion_reward(completion(text), preferred=preferred, score=scored(p_image_1, p_preferred))
    assert r.r_listener == pytest.approx(p_preferred)
    assert (r.r_accuracy, r.total) == pytest.approx(expected[:2])
    assert r.contradiction is expected[2]


@pytest.mark.parametrize("center, expected_listener", [(False, 0.0), (True, -0.5)])
def test_unusable_score_gets_no_listener_credit(center, expected_listener):
    # the reasoning was only a verdict: nothing left to read, scored as p = 0 whatever p the score carries
    r = completion_reward(completion(GOOD_1), preferred=1, score=scored(0.5, 0.5, usable=False),
                          center_listener=center)
    assert r.r_listener == expected_listener and not r.contradiction
    assert r.total == pytest.approx(1.0 + 0.5 + 0.5 * expected_listener)  # format + accuracy only (1.5, 1.25)
    doubted = completion_reward(completion(GOOD_1), preferred=1, score=scored(0.1, 0.1), center_listener=center)
    assert doubted.total > r.total  # a reasoning the listener doubts still beats saying nothing
    assert listener_reward(0.9, well_formed=True, usable=False) == 0.0


@pytest.mark.parametrize("preferred, p_image_1, p_preferred", [(1, 0.8, 0.8), (2, 0.8, 0.2), (2, 0.3, 0.7),
                                                                (1, 0.3, 0.3)])
def test_make_score_maps_p_image_1_to_the_preferred_image_by_hand(preferred, p_image_1, p_preferred):
    pair = next(synthetic_pair(0, i) for i in range(50) if synthetic_pair(0, i).preferred == preferred)
    s = make_score(ListenerRequest(pair=pair, completion_index=3, text="x"), p_image_1)
    assert (s.pair_id, s.completion_index, s.usable) == (pair.pair_id, 3, True)
    assert (s.p_image_1, s.p_preferred) == pytest.approx((p_image_1, p_preferred))
    unusable = make_score(ListenerRequest(pair=pair, completion_index=0, text=""), UNUSABLE_P, usable=False)
    assert not unusable.usable
    r = completion_reward(completion(format_target("x", preferred), pair_id=pair.pair_id, index=3),
                          preferred=preferred, score=s)
    assert r.r_listener == pytest.approx(p_preferred)  # the reward reads p(preferred), never p(image 1)


def test_listener_module_imports_without_ray():
    # make_score is pure: the actor module must import (and be unit-tested) without Ray, vLLM or torch
    code = "import sys, actors.listener; print(sorted(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


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


def test_agreement_metrics_by_hand():
    judged = [
        (1, scored(0.8, 0.8), 1),  # listener prefers 1 (p(image 1) .8), answer 1: agree, right
        (2, scored(0.3, 0.7), 2),  # preferred 2, listener p(image 1) .3 -> prefers 2; answer 2: agree, right
        (1, scored(0.3, 0.7), 2),  # listener prefers 2, answer 1: contradict, wrong
        (2, scored(0.9, 0.1), 2),  # listener prefers 1 (p(preferred 2) .1), answer 2: contradict, right
        (2, scored(0.9, 0.9), 1),  # preferred 1, listener prefers 1, answer 2: contradict, wrong
        (1, scored(0.5, 0.5), 2),  # a tie: judged, neither
        (None, scored(0.9, 0.9), 1),  # bad format: not judged
        (1, scored(0.5, 0.5, usable=False), 1),  # unusable: not judged
        (1, None, 1),  # no score: not judged
    ]
    m = agreement_metrics(judged)
    assert m["judged"] == 6
    assert (m["agree_rate"], m["contradiction_rate"]) == pytest.approx((2 / 6, 3 / 6))
    assert (m["accuracy_when_agree"], m["accuracy_when_contradict"]) == pytest.approx((1.0, 1 / 3))
    empty = agreement_metrics([(None, None, 1)])
    assert empty["judged"] == 0 and all(math.isnan(v) for k, v in empty.items() if k != "judged")


def test_answer_leak_rate_by_hand():
    texts = [
        (2, "<think>Picture #2 wins. Image 1 shows red.</think><answer>2</answer>"),  # early verdict: leak
        (1, "<think>Picture #2 wins. Image 1 shows red.</think><answer>1</answer>"),  # names the other: no
        (1, "<think>Image 1 shows red. Image 2 shows blue.</think><answer>1</answer>"),  # descriptions: no
        (2, "<think>Image 1 is red. So image 2 is better.</think><answer>2</answer>"),  # verdict masked: no
        (2, "<think>Image 2 is better.</think><answer>2</answer>"),  # nothing left to read: not counted
        (None, "<think>Picture #2 wins. x"),  # bad format: not counted
    ]
    assert answer_leak_rate(texts) == pytest.approx(1 / 4)
    assert math.isnan(answer_leak_rate(texts[4:]))


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
