"""actors/reward.py RewardAggregator: the join, advantages, the zero-variance filter and the metrics; scores
made by the listener worker's own `make_score`, pairs of both labels, every value worked by hand."""

from __future__ import annotations

import math

import pickle

import numpy as np
import pytest
from PIL import Image

from actors.listener import UNUSABLE_P, make_score
from actors.reward import RewardAggregator
from pipeline.config import RewardConfig
from pipeline.prompts import format_target
from pipeline.types import Completion, ListenerRequest, ListenerScore, PreferencePair, RolloutGroup

BAD = "no tags at all"
PIXEL = Image.new("RGB", (1, 1))


def group(pair_id: str, preferred: int, texts: list[str]) -> RolloutGroup:
    pair = PreferencePair(pair_id=pair_id, prompt="a red cube", image_1=PIXEL, image_2=PIXEL,
                          preferred=preferred)
    completions = tuple(
        Completion(pair_id=pair_id, completion_index=i, policy_version=3, token_ids=np.zeros(2, np.int64),
                   logprobs=np.zeros(2, np.float32), text=text, finish_reason="stop")
        for i, text in enumerate(texts))
    return RolloutGroup(pair=pair, prompt_token_ids=np.zeros(4, np.int64), completions=completions,
                        policy_version=3)


def score(pair_id: str, index: int, p_preferred: float, preferred: int, usable: bool = True) -> ListenerScore:
    p1 = p_preferred if preferred == 1 else 1 - p_preferred
    return ListenerScore(pair_id=pair_id, completion_index=index, p_image_1=p1, p_preferred=p_preferred,
                         usable=usable)


# Pair a (preferred 1): a0 answers 1, listener p(preferred) .8 -> 1 + .5 + .4 = 1.9
#                       a1 answers 2, listener p(preferred) .6 -> 1 + 0 + .3 = 1.3
#                       (the listener prefers image 1: a contradiction)
# Pair b (preferred 2): both badly formatted -> 0, 0 (zero variance); b0 scored .5, b1 unusable
GROUPS = [
    group("a", 1, [format_target("One is right.", 1), format_target("Two is right.", 2)]),
    group("b", 2, [BAD, BAD]),
]
SCORES = [score("a", 0, 0.8, 1), score("a", 1, 0.6, 1), score("b", 0, 0.5, 2), score("b", 1, 0.5, 2, usable=False)]


def test_scores_groups_by_hand():
    kept, m = RewardAggregator(RewardConfig(), "group").score(GROUPS, list(reversed(SCORES)))
    assert [s.group.pair_id for s in kept] == ["a"]
    # totals [1.9, 1.3]: mean 1.6, population std .3 -> advantages [1, -1]
    assert [r.total for r in kept[0].rewards] == pytest.approx([1.9, 1.3])
    np.testing.assert_allclose(kept[0].advantages, [1.0, -1.0], rtol=1e-5)
    assert kept[0].advantages.dtype == np.float32 and kept[0].advantages.shape == (2,)
    assert [r.contradiction for r in kept[0].rewards] == [False, True]
    expected = {
        "reward/mean": (1.9 + 1.3 + 0 + 0) / 4,
        "reward/std": float(np.std([1.9, 1.3, 0, 0])),
        "reward/format": 2 / 4,
        "reward/accuracy": 1 / 4,
        "reward/listener": (0.8 + 0.6 + 0 + 0) / 4,
        "rollout/format_rate": 2 / 4,
        "rollout/accuracy": 1 / 4,
        "rollout/accuracy_well_formed": 1 / 2,
        # usable scores: a0 p(image 1) .8 (y 1), a1 .6 (y 1), b0 .5 (y 0)
        "listener/brier": (0.2**2 + 0.4**2 + 0.5**2) / 3,  # .15
        "listener/ece": (0.2 + 0.4 + 0.5) / 3,  # each in its own bin of 10
        "listener/p_preferred": (0.8 + 0.6 + 0.5) / 3,
        # agreement over a0, a1 (well formed, usable): a0 agrees (right), a1 contradicts (wrong)
        "listener/judged": 2, "listener/agree_rate": 1 / 2, "listener/contradiction_rate": 1 / 2,
        "listener/accuracy_when_agree": 1.0, "listener/accuracy_when_contradict": 0.0,
        "listener/answer_leak_rate": 0.0,  # "One is right." / "Two is right." name no image in a verdict
        "listener/usable_rate": 3 / 4,
        "groups/total": 2, "groups/kept": 1, "groups/dropped": 1,
    }
    assert m.keys() == expected.keys()
    for name, value in expected.items():
        assert m[name] == pytest.approx(value), name


def test_keeps_zero_variance_groups_when_asked():
    kept, m = RewardAggregator(RewardConfig(drop_zero_variance=False)).score(GROUPS, SCORES)
    assert [s.group.pair_id for s in kept] == ["a", "b"]
    np.testing.assert_array_equal(kept[1].advantages, [0.0, 0.0])
    assert (m["groups/kept"], m["groups/dropped"]) == (2, 0)


def test_batch_and_no_scaling():
    # centred [.3, -.3, 0, 0]; batch std of [1.9, 1.3, 0, 0]: mean .8, var (1.21 + .25 + .64 + .64) / 4 = .685
    kept, _ = RewardAggregator(RewardConfig(drop_zero_variance=False), "batch").score(GROUPS, SCORES)
    np.testing.assert_allclose(kept[0].advantages, [0.3 / np.sqrt(0.685), -0.3 / np.sqrt(0.685)], rtol=1e-5)
    kept, _ = RewardAggregator(RewardConfig(), "none").score(GROUPS, SCORES)
    np.testing.assert_allclose(kept[0].advantages, [0.3, -0.3], rtol=1e-5)


def test_centred_listener_and_weights():
    # centred: a0 1 + .5 + .5 * .3 = 1.65; a1 1 + 0 + .5 * .1 = 1.05
    kept, _ = RewardAggregator(RewardConfig(center_listener=True)).score(GROUPS, SCORES)
    assert [r.total for r in kept[0].rewards] == pytest.approx([1.65, 1.05])
    # weights (2, 1, 1): a0 2 + 1 + .8 = 3.8; a1 2 + 0 + .6 = 2.6
    kept, _ = RewardAggregator(RewardConfig(w_format=2, w_accuracy=1, w_listener=1)).score(GROUPS, SCORES)
    assert [r.total for r in kept[0].rewards] == pytest.approx([3.8, 2.6])


def test_listener_off_needs_no_scores():
    # w_listener 0 and no scores: a0 1 + .5 = 1.5, a1 1; listener metrics present but undefined (NaN)
    kept, m = RewardAggregator(RewardConfig(w_listener=0)).score(GROUPS, [])
    assert [r.total for r in kept[0].rewards] == pytest.approx([1.5, 1.0])
    listener_metrics = {name: value for name, value in m.items() if name.startswith("listener/")}
    assert "listener/contradiction_rate" in listener_metrics and "listener/brier" in listener_metrics
    # the leak rate is read off the texts (defined without a listener); nothing is judged
    assert (listener_metrics.pop("listener/answer_leak_rate"), listener_metrics.pop("listener/judged")) == (0, 0)
    assert all(math.isnan(value) for value in listener_metrics.values())


# Scores come from the listener worker's make_score(request, p(image 1)), as in production.
# Pair c (preferred 2):  answer  p(image 1)  p(preferred)  total                     listener
#   c0 "Image 2 has ..."    2      .3          .7        1 + .5 + .35 = 1.85        agrees, right
#   c1 "Image 1 has ..."    1      .6          .4        1 + 0 + .2 = 1.2           agrees, wrong
#   c2 "Image 1 is better." 1      unusable (nothing left after masking): 1 + 0 + 0 = 1.0
#   c3 "Picture #2 wins..." 2      .8          .2        1 + .5 + .1 = 1.6          contradicts, right; leaks
# Pair d (preferred 1):
#   d0 "... left."          1      .9          .9        1 + .5 + .45 = 1.95        agrees, right
#   d1 "... right."         2      .7          .7        1 + 0 + .35 = 1.35         contradicts, wrong
#   d2 bad format           -      .2          .2        0
#   d3 "The cube is red."   2      .5          .5        1 + 0 + .25 = 1.25         a tie: neither
BOTH = [
    group("c", 2, [format_target("Image 2 has the red cube.", 2), format_target("Image 1 has the red cube.", 1),
                   format_target("Image 1 is better.", 1), format_target("Picture #2 wins. Red is there.", 2)]),
    group("d", 1, [format_target("Red cube on the left.", 1), format_target("Red cube on the right.", 2), BAD,
                   format_target("The cube is red.", 2)]),
]
P_IMAGE_1 = {("c", 0): 0.3, ("c", 1): 0.6, ("c", 3): 0.8, ("d", 0): 0.9, ("d", 1): 0.7, ("d", 2): 0.2, ("d", 3): 0.5}


def both_label_scores() -> list[ListenerScore]:
    out = []
    for g in BOTH:
        for c in g.completions:
            request = ListenerRequest(pair=g.pair, completion_index=c.completion_index, text=c.text)
            p1 = P_IMAGE_1.get((g.pair_id, c.completion_index))
            out.append(make_score(request, p1) if p1 is not None else make_score(request, UNUSABLE_P, usable=False))
    return out


def test_both_labels_by_hand():
    kept, m = RewardAggregator(RewardConfig()).score(BOTH, both_label_scores())
    by_pair = {s.group.pair_id: s.rewards for s in kept}
    assert [r.total for r in by_pair["c"]] == pytest.approx([1.85, 1.2, 1.0, 1.6])
    assert [r.total for r in by_pair["d"]] == pytest.approx([1.95, 1.35, 0.0, 1.25])
    assert [r.r_listener for r in by_pair["c"]] == pytest.approx([0.7, 0.4, 0.0, 0.2])
    assert [r.contradiction for r in by_pair["c"] + by_pair["d"]] == [False] * 3 + [True, False, True] + [False] * 2
    expected = {
        "reward/listener": (0.7 + 0.4 + 0 + 0.2 + 0.9 + 0.7 + 0 + 0.5) / 8,  # .425
        "listener/judged": 6,  # all but c2 (unusable) and d2 (bad format)
        "listener/agree_rate": 3 / 6, "listener/accuracy_when_agree": 2 / 3,  # c0 right, c1 wrong, d0 right
        "listener/contradiction_rate": 2 / 6, "listener/accuracy_when_contradict": 1 / 2,  # c3 right, d1 wrong
        "listener/answer_leak_rate": 1 / 6,  # c3 of the six with a masked reasoning
        "listener/usable_rate": 7 / 8,
        "listener/p_preferred": (0.7 + 0.4 + 0.2 + 0.9 + 0.7 + 0.2 + 0.5) / 7,
        # mean (1 - p(preferred))^2 over usable: .09 + .36 + .64 + .01 + .09 + .64 + .25 = 2.08
        "listener/brier": 2.08 / 7,
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value), name


@pytest.mark.parametrize("scores, message", [
    (SCORES[:-1], "no listener score"),
    (SCORES + [SCORES[0]], "duplicate listener score"),
    (SCORES + [score("zzz", 0, 0.5, 1)], "match no completion"),
])
def test_join_errors(scores, message):
    with pytest.raises(ValueError, match=message):
        RewardAggregator(RewardConfig()).score(GROUPS, scores)


def test_duplicate_completions_are_rejected():
    with pytest.raises(ValueError, match="appears twice"):
        RewardAggregator(RewardConfig()).score(GROUPS + [GROUPS[0]], SCORES)


def test_ragged_groups_are_rejected():
    ragged = [GROUPS[0], group("c", 1, [BAD])]
    with pytest.raises(ValueError, match="same number of completions"):
        RewardAggregator(RewardConfig()).score(ragged, SCORES[:2] + [score("c", 0, 0.5, 1)])


def test_empty_call_and_pickling():
    aggregator = RewardAggregator(RewardConfig(), "group")
    assert aggregator.score([], []) == ([], {"groups/total": 0.0, "groups/kept": 0.0, "groups/dropped": 0.0})
    clone = pickle.loads(pickle.dumps(aggregator))  # Ray ships the constructor arguments by pickling
    assert clone.reward == aggregator.reward and clone.advantage_scaling == "group"
