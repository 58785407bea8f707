"""bench.soak's accounting (the soak itself is long and not in CI: `python -m bench.soak`)."""

from __future__ import annotations

from bench.soak import KINDS, data_accounting, last_attempts, plan_faults, restarts_seen


def _row(step: int, position: float, skipped: float = 0.0, **extra) -> dict:
    return {"step": step, "data/position": position, "data/skipped_tie": skipped, **extra}


def test_a_resumed_step_counts_once_and_its_pairs_are_neither_lost_nor_doubled() -> None:
    # Step 2 ran, the learner died before its checkpoint, the resume re-ran step 2 from position 8.
    rows = [_row(0, 4), _row(1, 8), _row(2, 12), _row(2, 12), _row(3, 16)]
    lineage = last_attempts(rows)
    assert sorted(lineage) == [0, 1, 2, 3]
    assert data_accounting(lineage, 4, 4) == {"pairs_lost": 0, "pairs_trained_twice": 0}


def test_gaps_and_overlaps_are_counted_and_skipped_rows_are_not_pairs() -> None:
    assert data_accounting(last_attempts([_row(0, 4), _row(1, 12)]), 2, 4) == {"pairs_lost": 0,
                                                                               "pairs_trained_twice": 4}
    assert data_accounting(last_attempts([_row(0, 4), _row(2, 12)]), 3, 4)["pairs_lost"] == 4  # step 1 missing
    assert data_accounting(last_attempts([_row(0, 4), _row(1, 10, skipped=2)]), 2, 4) == {"pairs_lost": 0,
                                                                                          "pairs_trained_twice": 0}


def test_restart_counters_are_summed_over_resumed_attempts() -> None:
    rows = [{"rollout/restarts": 0, "listener/restarts": 0}, {"rollout/restarts": 1, "listener/restarts": 1},
            {"rollout/restarts": 0, "listener/restarts": 0},  # resumed: counters start again
            {"rollout/restarts": 2, "listener/restarts": 0}]
    assert restarts_seen(rows) == {"rollout": 3, "listener": 1}


def test_the_fault_plan_is_seeded_and_has_each_kind() -> None:
    plan = plan_faults(300, 3, seed=0)
    assert plan == plan_faults(300, 3, seed=0) and plan != plan_faults(300, 3, seed=1)
    assert sorted(f.kind for f in plan) == sorted(KINDS * 3)
    assert all(2 <= f.step < 298 for f in plan) and all(f.step < 150 for f in plan if f.kind == "mlflow")
    assert [f.step for f in plan] == sorted(f.step for f in plan)
