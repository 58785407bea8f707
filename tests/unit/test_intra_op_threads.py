"""actors/engine.py intra_op_threads: an actor's torch/OpenMP threads follow its CPU share."""

from __future__ import annotations

import pytest

from actors.engine import intra_op_threads


@pytest.mark.parametrize("num_cpus, threads", [(1, 1), (2, 2), (8, 8), (1.5, 1), (2.9999999999999996, 3),
                                               (0.5, 1), (0, 1)])
def test_threads_are_the_whole_cpus_of_the_share_and_at_least_one(num_cpus, threads) -> None:
    assert intra_op_threads(num_cpus) == threads
