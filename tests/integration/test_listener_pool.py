"""ListenerPool's limits and failure accounting, on real vLLM CPU listener engines in the local Ray cluster.

What docs/reliability.md and actors/listener.py promise, each shown on the real component:
- `resize(0)` is refused in one line and the pool keeps serving;
- a worker never holds more than `max_in_flight` requests, the rest wait in the pool's queue;
- a worker that raises on a request (here: a prompt longer than the engine's context) answers that
  request with the error and counts it `failed`; it is not retried and the worker is not replaced;
- a request whose worker dies `max_attempts` times is given up: an error for its caller, `failed`;
- a worker whose engine cannot start is restarted up to `max_start_failures` times, then removed; a pool
  with no worker left fails `ready()` and every queued request instead of waiting forever.

Run: `pytest -m integration tests/integration/test_listener_pool.py`.
"""

from __future__ import annotations

import time

import pytest

from pipeline.config import EngineConfig, ListenerConfig
from pipeline.synthetic import synthetic_pair
from pipeline.types import ListenerRequest

pytestmark = pytest.mark.integration

CAP = 2
CONFIG = ListenerConfig(num_workers=1, max_in_flight=CAP, engine=EngineConfig(dtype="float32", max_model_len=1024))
TEXT = ("<think>The prompt asks for a red circle. Image 1 shows a grey circle and image 2 shows a red circle, "
        "drawn on a white background.</think><answer>2</answer>")
TOO_LONG = "<think>" + "The circle is red and round. " * 600 + "</think><answer>1</answer>"  # > 1024 tokens


def _requests(start: int, count: int, text: str = TEXT) -> list[ListenerRequest]:
    return [ListenerRequest(pair=synthetic_pair(0, start + i), completion_index=0, text=text) for i in range(count)]


@pytest.fixture(scope="module")
def pool(ray_local, tiny_listener_dir):
    """One worker, `max_in_flight` 2, and a request given up the first time its worker dies."""
    from actors.listener import ListenerPool

    actor = ray_local.remote(ListenerPool).options(num_cpus=0, max_concurrency=64).remote(
        str(tiny_listener_dir), CONFIG, seed=0, max_attempts=1)
    assert ray_local.get(actor.ready.remote(), timeout=600)
    yield actor
    ray_local.get(actor.shutdown.remote())
    ray_local.kill(actor)


def test_resize_to_zero_is_refused_and_the_pool_keeps_serving(ray_local, pool) -> None:
    with pytest.raises(ValueError, match=r"ValueError: a listener pool needs at least one worker, got 0$"):
        ray_local.get(pool.resize.remote(0))
    stats = ray_local.get(pool.stats.remote())
    assert (stats.num_workers, stats.ready_workers) == (1, 1)
    assert len(ray_local.get(pool.score_requests.remote(_requests(0, 2)), timeout=300)) == 2


def test_a_worker_never_holds_more_than_max_in_flight(ray_local, pool) -> None:
    before = ray_local.get(pool.stats.remote())
    requests = _requests(100, 12)
    ref = pool.score_requests.remote(requests)
    seen = []
    while not ray_local.wait([ref], timeout=0)[0]:
        stats = ray_local.get(pool.stats.remote())
        seen.append((stats.in_flight, stats.queued))
    scores = ray_local.get(ref)
    assert [s.pair_id for s in scores] == [r.pair.pair_id for r in requests]
    assert max(in_flight for in_flight, _ in seen) == CAP  # one batch of CAP at a time, never more
    assert max(queued for _, queued in seen) >= len(requests) - CAP - 1  # the rest waited in the pool
    assert all(in_flight + queued <= len(requests) for in_flight, queued in seen)
    after = ray_local.get(pool.stats.remote())
    assert after.completed - before.completed == len(requests)
    assert (after.queued, after.in_flight, after.failed - before.failed) == (0, 0, 0)


def test_a_worker_that_raises_counts_the_request_failed_and_keeps_serving(ray_local, pool) -> None:
    before = ray_local.get(pool.stats.remote())
    with pytest.raises(Exception, match="maximum context length is 1024 tokens"):
        ray_local.get(pool.score_requests.remote(_requests(200, 1, TOO_LONG)), timeout=300)
    after = ray_local.get(pool.stats.remote())
    assert after.failed - before.failed == 1  # the raising request, reported once, not retried
    assert (after.retries, after.restarts, after.completed) == (before.retries, before.restarts, before.completed)
    assert len(ray_local.get(pool.score_requests.remote(_requests(210, 2)), timeout=300)) == 2  # same worker


def test_a_request_is_given_up_after_max_attempts(ray_local, pool) -> None:
    before = ray_local.get(pool.stats.remote())
    requests = _requests(300, 16)
    ref = pool.score_requests.remote(requests)
    deadline = time.monotonic() + 120
    while ray_local.get(pool.stats.remote()).in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    [worker] = ray_local.get(pool.workers.remote())
    ray_local.kill(worker)
    with pytest.raises(Exception, match="lost its worker 1 times"):  # max_attempts=1: no retry
        ray_local.get(ref, timeout=300)
    ray_local.get(pool.ready.remote(), timeout=600)  # the replacement serves
    deadline = time.monotonic() + 300
    while (stats := ray_local.get(pool.stats.remote())).queued + stats.in_flight and time.monotonic() < deadline:
        time.sleep(0.1)  # the rest of the call's requests, still queued, are answered by the replacement
    after = ray_local.get(pool.stats.remote())
    assert after.restarts - before.restarts == 1 and after.retries == before.retries
    lost = after.failed - before.failed
    assert 1 <= lost <= CAP  # exactly the requests the dead worker held; the caller's call fails
    assert after.completed - before.completed == len(requests) - lost  # the queued ones were still answered
    assert len(ray_local.get(pool.score_requests.remote(_requests(400, 2)), timeout=300)) == 2


def test_a_worker_that_cannot_start_is_retried_then_the_pool_fails_in_one_line(ray_local, tmp_path) -> None:
    from actors.listener import ListenerPool

    broken = tmp_path / "broken-listener"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_model"}\n')
    actor = ray_local.remote(ListenerPool).options(num_cpus=0, max_concurrency=64).remote(
        str(broken), CONFIG, seed=0, max_start_failures=2)
    try:
        waiting = actor.score_requests.remote(_requests(500, 1))
        with pytest.raises(Exception, match="the listener pool has no workers left"):
            ray_local.get(actor.ready.remote(), timeout=600)
        with pytest.raises(Exception, match="no listener worker could start"):
            ray_local.get(waiting, timeout=60)  # a queued request fails, it does not wait forever
        with pytest.raises(Exception, match="the listener pool has no workers left"):
            ray_local.get(actor.score_requests.remote(_requests(501, 1)), timeout=60)  # one sent afterwards
        stats = ray_local.get(actor.stats.remote())
        assert stats.restarts == 1  # started twice (max_start_failures=2), then removed
        assert (stats.ready_workers, stats.failed, stats.completed) == (0, 1, 0)
    finally:
        ray_local.kill(actor)
