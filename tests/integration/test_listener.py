"""ListenerPool and ListenerWorker on real vLLM CPU engines (tiny listener) inside the local Ray cluster.

One pool for the whole module; the tests run in order: scores, then resize 1 -> 2 -> 1 during a stream,
then a killed worker during a stream. Run: `pytest -m integration tests/integration/test_listener.py`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from pipeline.config import EngineConfig, ListenerConfig
from pipeline.prompts import listener_prompt, mask_answer
from pipeline.synthetic import synthetic_pair
from pipeline.types import ListenerRequest

pytestmark = pytest.mark.integration

CONFIG = ListenerConfig(num_workers=1, max_in_flight=2, engine=EngineConfig(dtype="float32"))
TEXTS = (
    "<think>The prompt asks for a red circle. Image 1 shows a red circle, image 2 a blue one.</think>"
    "<answer>1</answer>",
    "<think>Image 2 matches the shape. So image 2 is better.</think><answer>2</answer>",
    "<think>The colours differ between the two images",  # truncated, still has reasoning
    "<think></think><answer>1</answer>",  # nothing left after masking
)


def _requests(start: int, count: int) -> list[ListenerRequest]:
    """`count` requests with distinct (pair_id, completion_index), texts cycling through TEXTS."""
    return [ListenerRequest(pair=synthetic_pair(0, (start + i) // 4), completion_index=(start + i) % 4,
                            text=TEXTS[(start + i) % len(TEXTS)]) for i in range(count)]


@pytest.fixture(scope="module")
def pool(ray_local, tiny_listener_dir):
    from actors.listener import ListenerPool

    actor = ray_local.remote(ListenerPool).options(num_cpus=0, max_concurrency=64).remote(
        str(tiny_listener_dir), CONFIG, seed=0)
    assert ray_local.get(actor.ready.remote(), timeout=300)
    yield actor
    ray_local.get(actor.shutdown.remote())
    ray_local.kill(actor)


def _hf_p_image_1(tiny_listener_dir, requests: list[ListenerRequest]) -> list[float]:
    """p(image 1) from transformers' logits of the two answer tokens, renormalised by hand."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_listener_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_listener_dir, dtype=torch.float32).eval()
    one, two = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("1", "2"))
    probs = []
    for r in requests:
        enc = processor(text=[listener_prompt(r.pair.prompt, mask_answer(r.text))],
                        images=[r.pair.image_1, r.pair.image_2], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0, -1].double()
        probs.append(math.exp(logits[one]) / (math.exp(logits[one]) + math.exp(logits[two])))
    return probs


def test_scores_are_renormalised_answer_probabilities(ray_local, pool, tiny_listener_dir):
    requests = _requests(0, 8)
    scores = ray_local.get(pool.score_requests.remote(requests), timeout=300)
    assert [(s.pair_id, s.completion_index) for s in scores] == \
        [(r.pair.pair_id, r.completion_index) for r in requests]
    for r, s in zip(requests, scores):
        assert 0.0 <= s.p_image_1 <= 1.0
        p_image_2 = 1.0 - s.p_image_1  # the pair of probabilities over the two images
        assert s.p_preferred == (s.p_image_1 if r.pair.preferred == 1 else p_image_2)
        assert s.usable == bool(mask_answer(r.text))
    unusable = [s for r, s in zip(requests, scores) if not mask_answer(r.text)]
    assert unusable and all(s.p_image_1 == 0.5 and s.p_preferred == 0.5 for s in unusable)

    # Both answer tokens' logprobs come from the engine, never a top-k guess: the same numbers as
    # transformers' full softmax over the vocabulary, renormalised over the two tokens.
    usable = [(r, s) for r, s in zip(requests, scores) if s.usable]
    expected = _hf_p_image_1(tiny_listener_dir, [r for r, _ in usable])
    np.testing.assert_allclose([s.p_image_1 for _, s in usable], expected, atol=1e-4)
    assert len({round(s.p_image_1, 6) for _, s in usable}) > 1  # inputs matter

    again = ray_local.get(pool.score_requests.remote(requests), timeout=300)
    assert again == scores  # identical inputs, identical outputs (exact floats)


def test_both_labels_map_p_image_1_to_the_preferred_image(ray_local, pool):
    # one pair and the same pair with its label flipped: the listener reads the same inputs (the label never
    # reaches it), so p(image 1) is the same and p(preferred) is p(image 1) for label 1, 1 - p(image 1) for 2
    pair = synthetic_pair(0, 7)
    flipped = dataclasses.replace(pair, preferred=3 - pair.preferred)
    requests = [ListenerRequest(pair=p, completion_index=i, text=TEXTS[0]) for i, p in enumerate((pair, flipped))]
    scores = ray_local.get(pool.score_requests.remote(requests), timeout=300)
    by_label = {r.pair.preferred: s for r, s in zip(requests, scores, strict=True)}
    one, two = by_label[1], by_label[2]
    assert one.usable and two.usable and abs(one.p_image_1 - 0.5) > 1e-6  # p != .5 tells the labels apart
    assert one.p_image_1 == pytest.approx(two.p_image_1, abs=1e-6)
    assert one.p_preferred == pytest.approx(one.p_image_1, abs=1e-12)
    assert two.p_preferred == pytest.approx(1.0 - two.p_image_1, abs=1e-12)
    assert one.p_preferred + two.p_preferred == pytest.approx(1.0, abs=1e-6)


def test_score_takes_rollout_groups(ray_local, pool):
    from pipeline.types import Completion, RolloutGroup

    pair = synthetic_pair(0, 5)
    completions = tuple(Completion(pair_id=pair.pair_id, completion_index=i, policy_version=3,
                                   token_ids=np.zeros(1, np.int64), logprobs=np.zeros(1, np.float32),
                                   text=TEXTS[i], finish_reason="stop") for i in range(3))
    group = RolloutGroup(pair=pair, prompt_token_ids=np.zeros(1, np.int64), completions=completions,
                         policy_version=3)
    scores = ray_local.get(pool.score.remote([group]), timeout=300)
    assert [(s.pair_id, s.completion_index) for s in scores] == [(pair.pair_id, i) for i in range(3)]


def _stream_until(ray_local, pool, done_ref, refs: list, batches: list, next_start: int) -> int:
    """Submit a 2-request call every 0.2 s until `done_ref` is ready; returns the next request index."""
    while not ray_local.wait([done_ref], timeout=0.2)[0]:
        batch = _requests(next_start, 2)
        batches.append(batch)
        refs.append(pool.score_requests.remote(batch))
        next_start += 2
    return next_start


def _assert_exactly_once(ray_local, refs: list, batches: list) -> int:
    answered = [ray_local.get(ref, timeout=300) for ref in refs]
    keys = [(s.pair_id, s.completion_index) for scores in answered for s in scores]
    wanted = [(r.pair.pair_id, r.completion_index) for batch in batches for r in batch]
    assert keys == wanted and len(set(keys)) == len(keys)  # every request answered once, in order
    return len(keys)


def test_resize_during_a_stream_answers_each_request_once(ray_local, pool):
    before = ray_local.get(pool.stats.remote())
    batches = [_requests(1000 + 2 * i, 2) for i in range(6)]
    refs = [pool.score_requests.remote(batch) for batch in batches]
    grow = pool.resize.remote(2)
    start = _stream_until(ray_local, pool, grow, refs, batches, 2000)
    assert ray_local.get(grow) == 2
    stats = ray_local.get(pool.stats.remote())
    assert (stats.num_workers, stats.ready_workers) == (2, 2)
    more = [_requests(start + 2 * i, 2) for i in range(8)]  # a burst both workers share
    batches += more
    refs += [pool.score_requests.remote(batch) for batch in more]
    shrink = pool.resize.remote(1)
    _stream_until(ray_local, pool, shrink, refs, batches, start + 16)
    assert ray_local.get(shrink) == 1
    total = _assert_exactly_once(ray_local, refs, batches)
    after = ray_local.get(pool.stats.remote())
    assert (after.num_workers, after.ready_workers) == (1, 1)
    assert after.completed - before.completed == total
    assert (after.failed, after.retries, after.queued, after.in_flight) == (0, 0, 0, 0)


def test_killed_worker_loses_no_request(ray_local, pool):
    before = ray_local.get(pool.stats.remote())
    batches = [_requests(5000 + 2 * i, 2) for i in range(20)]
    refs = [pool.score_requests.remote(batch) for batch in batches]
    deadline = time.monotonic() + 60
    while ray_local.get(pool.stats.remote()).in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    [worker] = ray_local.get(pool.workers.remote())
    ray_local.kill(worker)
    total = _assert_exactly_once(ray_local, refs, batches)
    after = ray_local.get(pool.stats.remote())
    assert after.completed - before.completed == total and after.failed == before.failed
    assert after.restarts - before.restarts == 1 and after.retries - before.retries >= 1
    assert after.ready_workers == 1
    metrics = ray_local.get(pool.metrics.remote())
    assert metrics["listener/retries"] == after.retries and metrics["listener/restarts"] == after.restarts
