"""The pure helpers of actors/engine.py, actors/rollout.py and actors/listener.py (no engine, no Ray)."""

from __future__ import annotations

import numpy as np

from actors.engine import engine_kwargs
from actors.listener import UNUSABLE_P, default_worker_options, make_score, requests_of
from actors.rollout import placeholder_runs, sampled_logprobs
from pipeline.config import EngineConfig, ListenerConfig
from pipeline.synthetic import synthetic_pair
from pipeline.types import Completion, ListenerRequest, RolloutGroup


def test_placeholder_runs_one_length_per_image():
    pad = 7
    ids = np.array([1, 2, pad, pad, pad, pad, 3, 4, pad, pad, pad, pad, 5])
    assert placeholder_runs(ids, pad) == [4, 4]
    assert placeholder_runs(np.array([pad, pad, 1, pad]), pad) == [2, 1]  # runs at both ends
    assert placeholder_runs(np.array([1, 2, 3]), pad) == []
    assert placeholder_runs(np.array([], dtype=np.int64), pad) == []


def test_engine_kwargs_carry_the_config():
    kwargs = engine_kwargs(EngineConfig(dtype="float32", max_model_len=512), seed=3, max_images=2,
                           mm_processor_kwargs={"max_pixels": 12544})
    assert kwargs["dtype"] == "float32" and kwargs["max_model_len"] == 512 and kwargs["seed"] == 3
    assert kwargs["enforce_eager"] is True and kwargs["limit_mm_per_prompt"] == {"image": 2, "video": 0}
    assert kwargs["mm_processor_kwargs"] == {"max_pixels": 12544}
    assert "mm_processor_kwargs" not in engine_kwargs(EngineConfig(), seed=0, max_images=2, mm_processor_kwargs=None)


def test_make_score_maps_p_image_1_to_the_preferred_image():
    pair = synthetic_pair(0, 0)
    request = ListenerRequest(pair=pair, completion_index=2, text="x")
    score = make_score(request, 0.8)
    assert (score.pair_id, score.completion_index, score.p_image_1, score.usable) == (pair.pair_id, 2, 0.8, True)
    assert score.p_preferred == (0.8 if pair.preferred == 1 else 1.0 - 0.8)
    unusable = make_score(request, UNUSABLE_P, usable=False)
    assert (unusable.p_image_1, unusable.p_preferred, unusable.usable) == (0.5, 0.5, False)


def test_requests_of_groups_keeps_group_then_completion_order():
    groups = []
    for index in range(2):
        pair = synthetic_pair(0, index)
        completions = tuple(Completion(pair_id=pair.pair_id, completion_index=i, policy_version=0,
                                       token_ids=np.zeros(1, np.int64), logprobs=np.zeros(1, np.float32),
                                       text=f"t{index}{i}", finish_reason="stop") for i in range(3))
        groups.append(RolloutGroup(pair=pair, prompt_token_ids=np.zeros(1, np.int64), completions=completions,
                                   policy_version=0))
    requests = requests_of(groups)
    assert [(r.pair.pair_id, r.completion_index, r.text) for r in requests] == [
        (g.pair_id, i, f"t{k}{i}") for k, g in enumerate(groups) for i in range(3)]


def test_listener_workers_ask_for_the_pools_own_resource():
    options = default_worker_options(ListenerConfig(num_cpus=2, num_gpus=0.5, resource="listener-group"))
    assert options == {"num_cpus": 2, "num_gpus": 0.5, "resources": {"listener-group": 1}}


def test_sampled_logprobs_read_vllm_flat_and_per_position_layouts_alike():
    from vllm.logprobs import FlatLogprobs, Logprob

    token_ids, values = [5, 9, 5], [-0.25, -1.5, -0.125]
    per_position = [{t: Logprob(logprob=v, rank=1)} for t, v in zip(token_ids, values)]
    flat = FlatLogprobs()
    for position in per_position:
        flat.append(position)
    assert sampled_logprobs(token_ids, flat).tolist() == values
    assert sampled_logprobs(token_ids, per_position).tolist() == values
    assert sampled_logprobs(token_ids, flat).dtype == np.float32
    # A flat layout that is not one sampled token per position is read position by position.
    wider = FlatLogprobs()
    for t, v in zip(token_ids, values):
        wider.append({t: Logprob(logprob=v, rank=1), 0: Logprob(logprob=-9.0, rank=2)})
    assert sampled_logprobs(token_ids, wider).tolist() == values
