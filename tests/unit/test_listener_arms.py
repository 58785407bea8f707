"""The listener experiment's arms and evaluation (docs/listener.md): the oracle faithfulness reward, the
placebo shuffle, `reward/faithful`, the evaluation's agreement split and its OOD split; every value by hand."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from actors.reward import RewardAggregator
from pipeline.config import ConfigError, RewardConfig, load_config
from pipeline.heldout import eval_table, heldout_metrics
from pipeline.prompts import format_target
from pipeline.rewards import completion_reward, described_images, faithfulness, placebo_p
from pipeline.synthetic import (COLOURS, HELDOUT_COLOUR, SATURATED_COLOURS, UNRENDERED_COLOUR, draw_shape,
                                describe_synthetic_image, synthetic_pairs)
from pipeline.types import Completion, ListenerScore, PreferencePair, RolloutGroup


def make_group(pair: PreferencePair, texts: list[str]) -> RolloutGroup:
    completions = tuple(Completion(pair_id=pair.pair_id, completion_index=i, policy_version=0,
                                   token_ids=np.zeros(2, np.int64), logprobs=np.zeros(2, np.float32), text=text,
                                   finish_reason="stop") for i, text in enumerate(texts))
    return RolloutGroup(pair=pair, prompt_token_ids=np.zeros(4, np.int64), completions=completions, policy_version=0)


def score(pair_id: str, index: int, p_preferred: float, preferred: int, usable: bool = True) -> ListenerScore:
    return ListenerScore(pair_id=pair_id, completion_index=index,
                         p_image_1=p_preferred if preferred == 1 else 1 - p_preferred, p_preferred=p_preferred,
                         usable=usable)


# A pair drawn by hand: image 1 a grey circle (the failed render), image 2 the red circle the prompt asks for.
PAIR = PreferencePair(pair_id="p", prompt="a red circle", image_1=draw_shape("grey", "circle", 56, random.Random(0)),
                      image_2=draw_shape("red", "circle", 56, random.Random(1)), preferred=2)
FAITHFUL = "The prompt asks for a red circle. Image 1 shows a grey circle. Image 2 shows a red circle."
SWAPPED = "The prompt asks for a red circle. Image 1 shows a red circle. Image 2 shows a grey circle."
HALF = "Image 2 shows a red circle. Image 1 shows a red square."  # image 2 right, image 1 wrong


def test_faithfulness_counts_the_images_described_as_they_are() -> None:
    truth = ("grey circle", "red circle")
    assert described_images(FAITHFUL) == {1: "grey circle", 2: "red circle"}
    assert faithfulness(FAITHFUL, truth) == 1.0
    assert faithfulness(SWAPPED, truth) == 0.0
    assert faithfulness(HALF, truth) == 0.5
    assert faithfulness("Image 2 shows a red circle.", truth) == 0.5  # image 1 not described: unfaithful
    assert faithfulness("nothing about the images", truth) == 0.0
    # the first sentence about an image counts; "an" works too
    assert described_images("Image 1 shows an orange cube. Image 1 shows a red circle.") == {1: "orange cube"}


def test_placebo_permutes_the_usable_p_values_with_a_seeded_shuffle() -> None:
    scores = [score("a", 0, 0.9, 1), score("a", 1, 0.2, 1), score("b", 0, 0.7, 2), score("b", 1, 0.5, 2, usable=False)]
    shuffled = placebo_p(scores, "a")
    assert set(shuffled) == {("a", 0), ("a", 1), ("b", 0)}  # the unusable score keeps no credit
    assert sorted(shuffled.values()) == [0.2, 0.7, 0.9]  # the same values ...
    assert shuffled == placebo_p(list(reversed(scores)), "a")  # ... repeatably, whatever the order given
    expected = [0.9, 0.2, 0.7]  # sorted by key: a0, a1, b0
    random.Random("placebo:a").shuffle(expected)
    assert [shuffled[k] for k in (("a", 0), ("a", 1), ("b", 0))] == expected
    orders = {tuple(placebo_p(scores, key).values()) for key in "abcdefgh"}
    assert len(orders) > 1  # another step's key, another permutation


def test_completion_reward_takes_the_given_listener_term_only_when_well_formed() -> None:
    good = make_group(PAIR, [format_target(SWAPPED, 2), "bad format"]).completions
    s0, s1 = score("p", 0, 0.1, 2), score("p", 1, 0.9, 2)
    r = completion_reward(good[0], 2, s0, w_format=1, w_accuracy=1, w_listener=0.5, listener_term=0.8)
    assert (r.r_listener, r.total) == (0.8, pytest.approx(1 + 1 + 0.4))
    assert r.contradiction  # still the listener's own judgement: p(preferred) 0.1, answer 2
    bad = completion_reward(good[1], 2, s1, w_listener=0.5, listener_term=0.8)
    assert (bad.r_listener, bad.total) == (0.0, 0.0)


def test_oracle_arm_rewards_faithful_descriptions_and_logs_them() -> None:
    group = make_group(PAIR, [format_target(FAITHFUL, 2), format_target(SWAPPED, 2), format_target(HALF, 1), "bad"])
    scores = [score("p", i, p, 2) for i, p in enumerate([0.3, 0.3, 0.3, 0.3])]
    cfg = RewardConfig(w_format=1, w_accuracy=1, w_listener=0.5, listener_signal="oracle", log_faithfulness=True,
                       drop_zero_variance=False)
    kept, metrics = RewardAggregator(cfg, "none").score([group], scores)
    rewards = kept[0].rewards
    assert [r.r_listener for r in rewards] == [1.0, 0.0, 0.5, 0.0]
    assert [r.total for r in rewards] == pytest.approx([2.5, 2.0, 1.25, 0.0])
    assert metrics["reward/faithful"] == pytest.approx(0.5)  # (1 + 0 + .5) / 3 well-formed
    assert metrics["reward/listener"] == pytest.approx(1.5 / 4)
    _, listener_arm = RewardAggregator(RewardConfig(w_listener=0.5, log_faithfulness=True), "none").score(
        [group], scores)
    assert listener_arm["reward/faithful"] == pytest.approx(0.5)  # logged in every arm, the same
    assert listener_arm["reward/listener"] == pytest.approx(0.3 * 3 / 4)
    _, off = RewardAggregator(RewardConfig(w_listener=0.5), "none").score([group], scores)
    assert "reward/faithful" not in off


def test_placebo_arm_gives_the_same_rewards_to_other_completions() -> None:
    pairs = list(synthetic_pairs(0, 3, task="render-saturated"))
    groups = [make_group(pair, [format_target("Image 1 shows a red circle.", a) for a in (1, 2)]) for pair in pairs]
    ps = [0.95, 0.05, 0.6, 0.4, 0.8, 0.1]
    scores = [score(g.pair_id, i, ps[2 * k + i], g.pair.preferred) for k, g in enumerate(groups) for i in range(2)]
    cfg = RewardConfig(w_listener=0.5, listener_signal="placebo", drop_zero_variance=False)
    kept, _ = RewardAggregator(cfg, "none").score(groups, scores)
    got = [r.r_listener for s in kept for r in s.rewards]
    assert Counter(got) == Counter(ps) and got != ps  # the listener's values, on other completions
    shuffled = placebo_p(scores, groups[0].pair_id)
    assert got == [shuffled[(g.pair_id, i)] for g in groups for i in range(2)]
    assert [r.listener_p_preferred for s in kept for r in s.rewards] == ps  # the logged p is the real one


def test_oracle_and_faithfulness_need_synthetic_data() -> None:
    with pytest.raises(ConfigError, match="only data.source=synthetic"):
        load_config(None, ["reward.listener_signal=oracle", "data.source=org/dataset"])
    with pytest.raises(ConfigError, match="only data.source=synthetic"):
        load_config(None, ["reward.log_faithfulness=true", "data.source=org/dataset"])
    assert load_config(None, ["reward.listener_signal=placebo", "data.source=org/dataset"]).reward.listener_signal \
        == "placebo"


def test_heldout_metrics_report_format_accuracy_and_the_agreement_split_by_hand() -> None:
    # 4 pairs, preferred 2: answers 2 (right), 1 (wrong), 2 (right), unparsable
    groups = [make_group(PAIR, [format_target(FAITHFUL, 2)]), make_group(PAIR, [format_target(FAITHFUL, 1)]),
              make_group(PAIR, [format_target(SWAPPED, 2)]), make_group(PAIR, ["cut off <think>Image"])]
    # listener p(preferred): .9 agrees with the right answer; .8 contradicts the wrong one (prefers 2, it said 1);
    # .2 contradicts the right one; the unparsable one is not judged
    scores = [score("p", 0, p, 2) for p in (0.9, 0.8, 0.2, 0.5)]
    m = heldout_metrics(groups, "eval_ood", scores, with_faithfulness=True)
    assert m["eval_ood/accuracy"] == 0.5 and m["eval_ood/format_rate"] == 0.75
    assert m["eval_ood/accuracy_well_formed"] == pytest.approx(2 / 3)
    assert m["eval_ood/listener/judged"] == 3 and m["eval_ood/listener/agree_rate"] == pytest.approx(1 / 3)
    assert m["eval_ood/listener/contradiction_rate"] == pytest.approx(2 / 3)
    assert m["eval_ood/listener/accuracy_when_agree"] == 1.0
    assert m["eval_ood/listener/accuracy_when_contradict"] == 0.5  # .8: wrong; .2: right
    assert m["eval_ood/listener/p_preferred"] == pytest.approx((0.9 + 0.8 + 0.2 + 0.5) / 4)
    assert m["eval_ood/faithful"] == pytest.approx(2 / 3)  # faithful, faithful, swapped
    assert set(heldout_metrics(groups)) == {"eval/accuracy", "eval/format_rate", "eval/accuracy_well_formed"}
    table = eval_table(groups, scores)
    assert table["answer"] == [2, 1, 2, None] and table["listener_p_preferred"] == [0.9, 0.8, 0.2, 0.5]
    with pytest.raises(ValueError, match="3 listener scores for 4"):
        heldout_metrics(groups, "eval", scores[:3])


def test_the_ood_split_holds_out_white_which_the_warm_starts_and_tokenizer_know() -> None:
    from pipeline.sft import SftSettings, sft_pairs
    from pipeline.tiny import build_tokenizer

    assert HELDOUT_COLOUR in COLOURS and HELDOUT_COLOUR not in SATURATED_COLOURS
    tokenizer = build_tokenizer()
    assert len(tokenizer.encode(" white", add_special_tokens=False)) == 1  # no tokenizer confound
    train = list(synthetic_pairs(0, 80, task="render-saturated"))
    ood = list(synthetic_pairs(0, 30, task="render-white"))
    assert {p.prompt.split()[1] for p in train} == set(SATURATED_COLOURS)
    assert {p.prompt.split()[1] for p in ood} == {HELDOUT_COLOUR}
    for pair in [*train[:20], *ood]:
        colour, shape = pair.prompt.split()[1:]
        shown = {k: describe_synthetic_image(img) for k, img in ((1, pair.image_1), (2, pair.image_2))}
        assert shown[pair.preferred] == f"{colour} {shape}"
        assert shown[3 - pair.preferred] == f"{UNRENDERED_COLOUR} {shape}"
    assert not {p.pair_id for p in train} & {p.pair_id for p in synthetic_pairs(0, 80, task="render")}
    # the reasoner's warm start draws white prompts and white images (it learns to describe them)
    sft_prompts = {pair.prompt.split()[1] for step in range(4) for _, pair in sft_pairs(SftSettings(), step)}
    assert HELDOUT_COLOUR in sft_prompts
