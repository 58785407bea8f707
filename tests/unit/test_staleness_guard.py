"""pipeline/driver.py learn_step refuses a batch sampled further behind the learner than trainer.max_staleness
(before any actor is called, so no cluster is needed), and reports the versions it trains on."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.driver import PolicyState, learn_step, version_metrics
from pipeline.errors import TrainingAborted
from pipeline.synthetic import synthetic_pairs
from pipeline.types import RolloutGroup


def _groups(*versions: int) -> list[RolloutGroup]:
    return [RolloutGroup(pair=pair, prompt_token_ids=np.zeros(3, dtype=np.int64), completions=(), policy_version=v)
            for pair, v in zip(synthetic_pairs(0, len(versions)), versions)]


@pytest.mark.parametrize("max_staleness, learner_version, versions", [
    (0, 3, (3, 2)),  # on-policy: one group one version behind
    (1, 3, (3, 1)),  # one step off-policy: one group two versions behind
])
def test_a_group_older_than_allowed_stops_the_run(max_staleness, learner_version, versions) -> None:
    cfg = load_config(None, [f"trainer.max_staleness={max_staleness}"])
    with pytest.raises(TrainingAborted, match=f"sampled {learner_version - min(versions)} policy versions ago"):
        learn_step(5, _groups(*versions), [], {}, actors=None, cfg=cfg, policy=PolicyState(version=learner_version),
                   t_start=0.0)


def test_version_metrics_are_the_oldest_and_newest_group() -> None:
    assert version_metrics(_groups(4, 3, 4)) == {"rollout/policy_version_min": 3.0, "rollout/policy_version_max": 4.0}
