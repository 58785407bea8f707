"""The listener pool's resizes that cannot be placed, and its autoscaling, on real vLLM CPU listener engines in
the local Ray cluster (issue 28).

- A growth the cluster has no room for (each new worker asks for more `listener` units than are free, as a
  KubeRay group at its maxReplicas would leave it) used to wait forever holding the resize lock, so every
  later resize, scale-down included, blocked too. Now it gives up within its timeout with one line naming
  what the cluster lacks, and a later resize makes a growth still waiting give way; requests streamed
  meanwhile are each answered once.
- `listener.autoscale`: load drives the pool from its min to its max, and it shrinks back to its min after
  the cool-down once the load stops; a manual resize pins the size for `override_hold_s` and is refused
  above `max_workers`. Every request is answered once (ids checked). Seconds-scale cool-downs.

With LISTENER_AUTOSCALE_TIMELINE=PATH the autoscaling test writes the pool's `metrics()` (the `listener/*`
figures the driver logs every step), read every 0.25 s, to PATH: `python -m bench.autoscale PATH` plots it.

Run: `pytest -m integration tests/integration/test_listener_autoscale.py`.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from pipeline.config import AutoscaleConfig, EngineConfig, ListenerConfig
from pipeline.synthetic import synthetic_pair
from pipeline.types import ListenerRequest

pytestmark = pytest.mark.integration

ENGINE = EngineConfig(dtype="float32", max_model_len=1024)
TEXT = ("<think>The prompt asks for a red circle. Image 1 shows a grey circle and image 2 shows a red circle, "
        "drawn on a white background.</think><answer>2</answer>")


def _requests(start: int, count: int) -> list[ListenerRequest]:
    return [ListenerRequest(pair=synthetic_pair(0, start + i), completion_index=0, text=TEXT) for i in range(count)]


def _assert_each_answered_once(ray, refs: list, batches: list) -> None:
    answered = [ray.get(ref, timeout=300) for ref in refs]
    keys = [(s.pair_id, s.completion_index) for scores in answered for s in scores]
    wanted = [(r.pair.pair_id, r.completion_index) for batch in batches for r in batch]
    assert keys == wanted and len(set(keys)) == len(keys)


def _pool(ray, model: str, listener: ListenerConfig, options: dict):
    from actors.listener import ListenerPool

    actor = ray.remote(ListenerPool).options(num_cpus=0, max_concurrency=64).remote(
        model, listener, worker_options=options, seed=0)
    assert ray.get(actor.ready.remote(), timeout=600)
    return actor


def test_a_growth_the_cluster_cannot_place_gives_up_in_time_and_frees_the_lock(ray_local, tiny_listener_dir):
    ray = ray_local
    # Two workers fill the cluster, so a third cannot be placed. Wait for an earlier test's workers to be
    # released first (Ray frees a killed actor's resources asynchronously): the free count is then exact.
    total = ray.cluster_resources()["listener"]
    deadline = time.monotonic() + 120
    while ray.available_resources().get("listener", 0) < total and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("listener", 0) == total, "an earlier test still holds listener units"
    units = total / 2
    pool = _pool(ray, str(tiny_listener_dir), ListenerConfig(num_workers=2, max_in_flight=2, engine=ENGINE),
                 {"num_cpus": 1, "resources": {"listener": units}})
    try:
        batches = [_requests(100 + 4 * i, 4) for i in range(6)]
        refs = [pool.score_requests.remote(batch) for batch in batches]
        # 1. Within its timeout: the engine that got no resources is given up, with one line naming them.
        start = time.monotonic()
        result = ray.get(pool.scale_to.remote(3, 4.0), timeout=60)
        assert 4.0 <= time.monotonic() - start < 20
        assert (result.before, result.serving) == (2, 2)
        assert f"1 of 1 new listener workers were not up within 4 s (the cluster lacks listener (needs {units:g}, " \
               "0 free)" in result.error and "\n" not in result.error
        # 2. The old hang: with a long timeout, the growth still waits ...
        stuck = pool.scale_to.remote(3, 600.0)
        assert not ray.wait([stuck], timeout=3)[0]
        more = [_requests(200 + 4 * i, 4) for i in range(4)]
        batches += more
        refs += [pool.score_requests.remote(batch) for batch in more]  # requests still flow meanwhile
        # ... and a later resize, a scale-down, does not block behind it: the growth gives way.
        start = time.monotonic()
        shrunk = ray.get(pool.scale_to.remote(1, 60.0), timeout=120)
        assert (shrunk.serving, shrunk.error) == (1, "") and time.monotonic() - start < 30
        gave_way = ray.get(stuck, timeout=10)
        assert "not up before a later resize came" in gave_way.error and "listener (needs" in gave_way.error
        _assert_each_answered_once(ray, refs, batches)
        stats = ray.get(pool.stats.remote())
        assert (stats.num_workers, stats.ready_workers, stats.failed, stats.queued, stats.in_flight) == (1, 1, 0, 0, 0)
        assert stats.completed == sum(len(b) for b in batches)
    finally:
        ray.get(pool.shutdown.remote())
        ray.kill(pool)


def _sample(ray, pool, timeline: list, t0: float) -> dict:
    row = ray.get(pool.metrics.remote()) | {"t_s": time.monotonic() - t0}
    timeline.append(row)
    return row


def test_autoscaling_grows_to_max_under_load_and_shrinks_to_min_after_the_cooldown(ray_local, tiny_listener_dir):
    ray = ray_local
    rule = AutoscaleConfig(enabled=True, min_workers=1, max_workers=2, target_backlog_per_worker=2, interval_s=0.25,
                           scale_up_cooldown_s=0, scale_down_cooldown_s=3, resize_timeout_s=300, override_hold_s=4)
    pool = _pool(ray, str(tiny_listener_dir), ListenerConfig(num_workers=1, max_in_flight=2, engine=ENGINE,
                                                             autoscale=rule),
                 {"num_cpus": 1, "resources": {"listener": 1}})
    timeline: list[dict] = []
    t0 = time.monotonic()
    batches, refs = [], []
    try:
        # Load: keep ~8 requests waiting (4 per worker at the max, twice the target) until both workers serve.
        deadline = time.monotonic() + 300
        while (row := _sample(ray, pool, timeline, t0))["listener/ready_workers"] < 2:
            assert time.monotonic() < deadline, "the pool did not grow under load"
            if row["listener/queued"] + row["listener/in_flight"] < 8:
                batches.append(_requests(1000 + 4 * len(batches), 4))
                refs.append(pool.score_requests.remote(batches[-1]))
            time.sleep(0.25)
        for _ in range(8):  # both workers share the load for a while
            batches.append(_requests(1000 + 4 * len(batches), 4))
            refs.append(pool.score_requests.remote(batches[-1]))
            _sample(ray, pool, timeline, t0)
            time.sleep(0.25)
        _assert_each_answered_once(ray, refs, batches)
        t_idle = time.monotonic() - t0
        # No load: back to the min, only after the cool-down.
        while (row := _sample(ray, pool, timeline, t0))["listener/num_workers"] > 1:
            assert row["t_s"] < t_idle + 60, "the pool did not shrink"
            time.sleep(0.25)
        t_grown = next(r["t_s"] for r in timeline if r["listener/ready_workers"] == 2)
        assert all(r["listener/num_workers"] == 2 for r in timeline if t_grown <= r["t_s"] <= t_idle)  # held under load
        t_busy = max(r["t_s"] for r in timeline if r["listener/backlog_peak"] > rule.target_backlog_per_worker)
        assert row["t_s"] - t_busy >= rule.scale_down_cooldown_s - 1  # the last load that wanted 2, + the cool-down
        assert max(r["listener/num_workers"] for r in timeline) == 2  # never above the max
        # A manual resize overrides: above the max it is refused; within, it holds while idle, then autoscaling
        # takes the pool back to its min.
        with pytest.raises(ValueError, match=r"asked for 3 listener workers, above listener.autoscale.max_workers=2"):
            ray.get(pool.scale_to.remote(3, 60.0))
        pinned = ray.get(pool.scale_to.remote(2, 300.0), timeout=400)
        assert (pinned.serving, pinned.error, pinned.hold_s) == (2, "", rule.override_hold_s)
        t_pinned = time.monotonic() - t0
        while (row := _sample(ray, pool, timeline, t0))["listener/num_workers"] > 1:
            assert row["t_s"] < t_pinned + 60, "autoscaling did not resume after the hold"
            time.sleep(0.25)
        assert row["t_s"] - t_pinned >= rule.override_hold_s - 0.5  # idle all along, but pinned until then
        stats = ray.get(pool.stats.remote())
        assert stats.completed == sum(len(b) for b in batches)
        assert (stats.failed, stats.retries, stats.queued, stats.in_flight) == (0, 0, 0, 0)
        latencies = [r["listener/latency_mean_s"] for r in timeline if r["listener/latency_mean_s"] > 0]  # not NaN
        assert latencies and all(r["listener/latency_max_s"] >= r["listener/latency_mean_s"] for r in timeline
                                 if r["listener/latency_mean_s"] > 0)
    finally:
        if os.environ.get("LISTENER_AUTOSCALE_TIMELINE"):
            with open(os.environ["LISTENER_AUTOSCALE_TIMELINE"], "w") as out:
                json.dump({"rule": rule.model_dump(), "timeline": timeline}, out)
        ray.get(pool.shutdown.remote())
        ray.kill(pool)
