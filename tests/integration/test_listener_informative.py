"""The informative listener end to end: `tiny://listener-sft` behind the real ListenerPool (vLLM CPU) and the
real RewardAggregator, on held-out synthetic pairs it never trained on.

Checked: a faithful reasoning (the images described as they are) gets p_preferred >= 0.8; the same
reasoning with the two images' descriptions swapped <= 0.2; the pair's label swap (images exchanged,
preferred 1 <-> 2, the same text) flips the score; and what the listener reads is the masked reasoning: a
verdict sentence and an answer block naming the wrong image leave the score exactly as it was.
The listener (make-tiny + `pipeline.sft`, role listener, a few minutes on CPU) is the session fixture
`tiny_listener_sft_dir` (tests/conftest.py), built once per test run and shared with the learning test.
Run: `pytest -m integration tests/integration/test_listener_informative.py`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import EngineConfig, ListenerConfig, RewardConfig
from pipeline.heldout import HELDOUT_SEED_OFFSET
from pipeline.prompts import format_target
from pipeline.sft import sft_reasoning
from pipeline.synthetic import synthetic_pairs
from pipeline.types import Completion, PreferencePair, RolloutGroup

pytestmark = pytest.mark.integration

CONFIG = ListenerConfig(num_workers=1, max_in_flight=4, engine=EngineConfig(dtype="float32"))
REWARD = RewardConfig(w_format=1.0, w_accuracy=1.0, w_listener=0.5, drop_zero_variance=False)
# The training task and its out-of-distribution split (white vs grey; docs/listener.md); not `match`, where
# the tiny listener stays at chance, nor `render-ood`, whose colour words the tiny tokenizer splits into
# pieces the listener never read (faithful p down to 0.29 there).
PAIRS = [*synthetic_pairs(HELDOUT_SEED_OFFSET, 6, task="render-saturated"),
         *synthetic_pairs(HELDOUT_SEED_OFFSET, 6, task="render-white")]
WRONG_VERDICT = " So image {wrong} is better."  # a verdict sentence the masking removes


def _other(index: int) -> int:
    return 2 if index == 1 else 1


def _label_swapped(pair: PreferencePair) -> PreferencePair:
    """The same pair with the images exchanged and the label with them (same prompt, same id)."""
    return dataclasses.replace(pair, image_1=pair.image_2, image_2=pair.image_1, preferred=_other(pair.preferred))


def _group(pair: PreferencePair, texts: list[str]) -> RolloutGroup:
    completions = tuple(Completion(pair_id=pair.pair_id, completion_index=i, policy_version=0,
                                   token_ids=np.zeros(1, np.int64), logprobs=np.zeros(1, np.float32),
                                   text=text, finish_reason="stop") for i, text in enumerate(texts))
    return RolloutGroup(pair=pair, prompt_token_ids=np.zeros(1, np.int64), completions=completions,
                        policy_version=0)


def _texts(pair: PreferencePair) -> list[str]:
    """0: faithful, right answer; 1: faithful + a verdict and answer naming the wrong image;
    2: swapped descriptions, right answer; 3: swapped + the wrong verdict."""
    wrong = _other(pair.preferred)
    faithful, swapped = sft_reasoning(pair), sft_reasoning(pair, swap=True)
    return [format_target(faithful, pair.preferred),
            format_target(faithful + WRONG_VERDICT.format(wrong=wrong), wrong),
            format_target(swapped, pair.preferred),
            format_target(swapped + WRONG_VERDICT.format(wrong=wrong), wrong)]


@pytest.fixture(scope="module")
def rewards(ray_local, tiny_listener_sft_dir):
    """(pair, label-swapped) -> the aggregator's CompletionRewards and the pool's scores, for every pair."""
    from actors.listener import ListenerPool
    from actors.reward import RewardAggregator

    pool = ray_local.remote(ListenerPool).options(num_cpus=0, max_concurrency=64).remote(
        str(tiny_listener_sft_dir), CONFIG, seed=0)
    assert ray_local.get(pool.ready.remote(), timeout=300)
    try:
        groups = [_group(pair, _texts(pair)) for pair in PAIRS]
        # The label swap keeps each text: the reasoning now describes image 1 as what image 2 shows.
        swapped_groups = [_group(_label_swapped(pair), _texts(pair)) for pair in PAIRS]
        aggregator = RewardAggregator(REWARD, advantage_scaling="batch")
        out = {}
        for name, gs in (("pair", groups), ("label_swapped", swapped_groups)):
            scores = ray_local.get(pool.score.remote(gs), timeout=600)
            scored, _ = aggregator.score(gs, scores)
            out[name] = ({s.group.pair.pair_id: s.rewards for s in scored},
                         {(s.pair_id, s.completion_index): s for s in scores})
        return out
    finally:
        ray_local.get(pool.shutdown.remote())
        ray_local.kill(pool)


def test_faithful_reasoning_convinces_and_swapped_descriptions_do_not(rewards):
    by_pair, _ = rewards["pair"]
    faithful = [by_pair[p.pair_id][0].listener_p_preferred for p in PAIRS]
    swapped = [by_pair[p.pair_id][2].listener_p_preferred for p in PAIRS]
    assert min(faithful) >= 0.8, faithful
    assert max(swapped) <= 0.2, swapped
    for p in PAIRS:  # the listener reward is p(preferred) and a disagreeing listener is a contradiction
        right, contradicted = by_pair[p.pair_id][0], by_pair[p.pair_id][2]
        assert right.r_listener == pytest.approx(right.listener_p_preferred)
        assert not right.contradiction and contradicted.contradiction


def test_the_label_swap_of_a_pair_flips_the_score(rewards):
    by_pair, scores = rewards["pair"]
    swapped_by_pair, swapped_scores = rewards["label_swapped"]
    for p in PAIRS:
        for k in range(4):
            before, after = scores[(p.pair_id, k)], swapped_scores[(p.pair_id, k)]
            # The listener reads the same text (images in the other order): it still names the image the
            # text supports by position, which is now the other image of the pair.
            assert after.p_preferred == pytest.approx(1.0 - before.p_preferred, abs=0.05)
            assert abs(after.p_image_1 - before.p_image_1) <= 0.05
        assert swapped_by_pair[p.pair_id][0].listener_p_preferred <= 0.2
        assert swapped_by_pair[p.pair_id][2].listener_p_preferred >= 0.8


def test_the_listener_reads_the_masked_reasoning_not_the_answer(rewards):
    _, scores = rewards["pair"]
    for p in PAIRS:
        # A verdict and an answer naming the wrong image are masked: the listener's input, hence its score,
        # is exactly the one without them.
        assert scores[(p.pair_id, 1)].p_image_1 == scores[(p.pair_id, 0)].p_image_1
        assert scores[(p.pair_id, 3)].p_image_1 == scores[(p.pair_id, 2)].p_image_1
