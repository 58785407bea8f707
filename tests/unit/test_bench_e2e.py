"""bench/e2e.py's arithmetic on a run's metric rows and CPU samples (no run here: the numbers are by hand)."""

from __future__ import annotations

import pytest

from bench.e2e import WORKLOADS, e2e_table, step_rows, summarise


class Samples:
    """A sampler stand-in holding fixed samples: (time, busy core-seconds so far)."""

    def __init__(self, samples):
        from bench.e2e import TreeSampler

        self.samples = samples
        self.busy_between = TreeSampler.busy_between.__get__(self)
        self.peak_rss_by_kind = {"rollout": 2 * 2**30, "learner": 2**29}


def _row(step: int, at: float, step_s: float, completions: int, rollout_s: float, tokens: int) -> dict:
    return {"step": step, "timestamp_ms": at * 1000, "time/step_s": step_s, "time/rollout_s": rollout_s,
            "throughput/samples_per_s": completions / step_s, "throughput/rollout_tokens_per_s": tokens / rollout_s,
            "time/learn_s": 1.0, "sync/bytes": 10.0, "loss": 0.5, "learn/skipped": 0.0, "policy/staleness": 1.0}


def test_per_step_seconds_rates_and_cpu_utilisation(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # Busy core-seconds: 0 at t=100, 3 at t=110, 5 at t=112, 8 at t=114 (linear in between).
    sampler = Samples([(100.0, 0.0), (110.0, 3.0), (112.0, 5.0), (114.0, 8.0)])
    rows = [_row(0, 110.0, 9.0, 32, 4.0, 1000), _row(1, 112.0, 1.9, 32, 1.0, 640), _row(2, 114.0, 1.9, 32, 1.0, 1280)]
    steps = step_rows(rows, start=100.0, sampler=sampler)
    assert [s["seconds"] for s in steps] == [10.0, 2.0, 2.0]
    assert [s["completions_per_s"] for s in steps] == pytest.approx([3.2, 16.0, 16.0])
    assert [s["tokens_per_s"] for s in steps] == pytest.approx([100.0, 320.0, 640.0])
    assert [s["cpu_utilisation"] for s in steps] == pytest.approx([3 / 20, 2 / 4, 3 / 4])
    assert steps[1]["stages_s"] == {"time/step_s": 1.9, "time/rollout_s": 1.0, "time/learn_s": 1.0, "sync/bytes": 10.0}
    run = summarise("tiny", 1, ["python", "-m", "pipeline", "train"], steps, sampler, 15.0)
    assert run["steps_counted"] == [1, 2]  # the first step is the warm-up
    assert run["s_per_step_median"] == 2.0 and run["s_per_step_range"] == [2.0, 2.0]
    assert run["completions_per_s"] == pytest.approx(64 / 4) and run["tokens_per_s"] == pytest.approx(1920 / 4)
    assert run["cpu_utilisation"] == pytest.approx((0.5 + 0.75) / 2)
    assert run["peak_rss_mib_by_kind"] == {"learner": 512, "rollout": 2048}
    table = "\n".join(e2e_table({"runs": {"tiny-s1": run}}))
    assert "| tiny | pipeline, max_staleness 1 (float32) | 2.00 (2.00-2.00) | 16.00 | 480 | 0.35x | 62% |" in table


def test_the_workloads_are_the_issues() -> None:
    mid, tiny = WORKLOADS["mid"]["overrides"], WORKLOADS["tiny"]["overrides"]
    for key in ("data.pairs_per_step=16", "rollout.group_size=8", "rollout.max_new_tokens=128", "data.image_size=64",
                "trainer.steps=4", "trainer.checkpoint_every=1000", "learner.lr=1e-5",
                "reward.drop_zero_variance=false"):
        assert key in mid
    for key in ("data.pairs_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=64",
                "rollout.engine.dtype=float32", "listener.engine.dtype=float32"):
        assert key in tiny
