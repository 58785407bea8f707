"""RewardAggregator: rollout groups + listener scores in, scored groups with advantages and metrics out.

A thin plain class over `pipeline.rewards` and `pipeline.grpo.group_advantages`; the driver makes it a Ray
actor with `ray.remote(RewardAggregator)`. All the math lives in those pure modules.

- Scores join completions by (pair_id, completion_index); a missing, duplicate or unknown score is an
  error. With the listener off (w_listener = 0) scores may be left out entirely.
- Advantages are computed over every group of the call (so "batch" scaling sees the whole step), then
  groups whose rewards are all equal are dropped when `drop_zero_variance` (their advantages are all 0).
- Metrics are over every group of the call, before the filter.
- `reward.listener_signal` picks the listener term: the listener's p, the oracle faithfulness of the masked
  reasoning against the images' true descriptions (read off the synthetic pixels), or the placebo (the
  call's usable p values shuffled, seeded by its first pair id: repeatable, different every step).
  `reward.log_faithfulness` adds `reward/faithful`: the mean oracle faithfulness of the well-formed
  completions, in any arm.

Run the tests: `.venv/bin/python -m pytest tests/unit/test_reward_aggregator.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.config import RewardConfig
from pipeline.grpo import AdvantageScaling, group_advantages
from pipeline.prompts import mask_answer
from pipeline.rewards import (ScoreKey, completion_reward, faithfulness, has_reward_variance, listener_reward,
                              placebo_p, reward_metrics)
from pipeline.synthetic import describe_synthetic_image
from pipeline.types import CompletionReward, ListenerScore, RolloutGroup, ScoredGroup


class RewardAggregator:
    """Rewards -> group-relative advantages -> `ScoredGroup`s, plus the step's reward metrics."""

    def __init__(self, reward: RewardConfig, advantage_scaling: AdvantageScaling = "group") -> None:
        self.reward = reward
        self.advantage_scaling = advantage_scaling

    def score(
        self, groups: Sequence[RolloutGroup], scores: Sequence[ListenerScore]
    ) -> tuple[list[ScoredGroup], dict[str, float]]:
        """Score every completion, compute advantages, drop zero-variance groups; (kept groups, metrics)."""
        if not groups:
            return [], {"groups/total": 0.0, "groups/kept": 0.0, "groups/dropped": 0.0}
        by_key = self._join(groups, scores)
        faithful = self._faithfulness(groups) if self._needs_faithfulness() else {}
        terms = self._listener_terms(groups, by_key, faithful)
        rewards = [self._group_rewards(group, by_key, terms) for group in groups]
        advantages_BG = self._advantages(groups, rewards)
        scored = [ScoredGroup(group=group, rewards=group_rewards, advantages=adv_G)
                  for group, group_rewards, adv_G in zip(groups, rewards, advantages_BG)]
        kept = [s for s in scored if not self.reward.drop_zero_variance
                or has_reward_variance([r.total for r in s.rewards])]
        metrics = reward_metrics(groups, rewards, by_key)
        if self.reward.log_faithfulness:
            formed = [faithful[(r.pair_id, r.completion_index)] for group in rewards for r in group
                      if r.answer is not None]
            metrics["reward/faithful"] = float(np.mean(formed)) if formed else float("nan")
        metrics.update({"groups/total": float(len(scored)), "groups/kept": float(len(kept)),
                        "groups/dropped": float(len(scored) - len(kept))})
        return kept, metrics

    def _join(
        self, groups: Sequence[RolloutGroup], scores: Sequence[ListenerScore]
    ) -> dict[ScoreKey, ListenerScore]:
        by_key: dict[ScoreKey, ListenerScore] = {}
        for s in scores:
            key = (s.pair_id, s.completion_index)
            if key in by_key:
                raise ValueError(f"duplicate listener score for pair {key[0]!r} completion {key[1]}")
            by_key[key] = s
        keys = [(c.pair_id, c.completion_index) for g in groups for c in g.completions]
        wanted = set(keys)
        if len(wanted) != len(keys):
            raise ValueError("the same (pair_id, completion_index) appears twice among the rollout groups")
        unknown = sorted(set(by_key) - wanted)
        if unknown:
            raise ValueError(f"{len(unknown)} listener score(s) match no completion, e.g. {unknown[:3]}")
        missing = sorted(wanted - set(by_key))
        listener_off = self.reward.w_listener == 0 and not by_key
        if missing and not listener_off:
            raise ValueError(f"{len(missing)} completion(s) have no listener score, e.g. {missing[:3]}")
        return by_key

    def _needs_faithfulness(self) -> bool:
        return self.reward.log_faithfulness or self.reward.listener_signal == "oracle"

    @staticmethod
    def _faithfulness(groups: Sequence[RolloutGroup]) -> dict[ScoreKey, float]:
        """Oracle faithfulness of every completion's masked reasoning (what the listener reads)."""
        out: dict[ScoreKey, float] = {}
        for group in groups:
            truth = (describe_synthetic_image(group.pair.image_1), describe_synthetic_image(group.pair.image_2))
            for c in group.completions:
                out[(c.pair_id, c.completion_index)] = faithfulness(mask_answer(c.text), truth)
        return out

    def _listener_terms(self, groups: Sequence[RolloutGroup], by_key: dict[ScoreKey, ListenerScore],
                        faithful: dict[ScoreKey, float]) -> dict[ScoreKey, float] | None:
        """The listener term of each completion in the control arms; None: the listener's own p."""
        signal = self.reward.listener_signal
        if signal == "oracle":
            return faithful
        if signal == "placebo":
            shuffled = placebo_p(list(by_key.values()), groups[0].pair_id)
            return {key: listener_reward(shuffled.get(key, 0.0), True, self.reward.center_listener,
                                         usable=key in shuffled) for key in by_key}
        return None

    def _group_rewards(
        self, group: RolloutGroup, by_key: dict[ScoreKey, ListenerScore],
        terms: dict[ScoreKey, float] | None = None,
    ) -> tuple[CompletionReward, ...]:
        cfg = self.reward
        return tuple(
            completion_reward(c, group.pair.preferred, by_key.get((c.pair_id, c.completion_index)),
                              w_format=cfg.w_format, w_accuracy=cfg.w_accuracy, w_listener=cfg.w_listener,
                              center_listener=cfg.center_listener,
                              listener_term=None if terms is None else terms.get((c.pair_id, c.completion_index)))
            for c in group.completions
        )

    def _advantages(
        self, groups: Sequence[RolloutGroup], rewards: list[tuple[CompletionReward, ...]]
    ) -> np.ndarray:
        sizes = {len(r) for r in rewards}
        if len(sizes) != 1:
            raise ValueError(f"groups must all have the same number of completions, got sizes {sorted(sizes)} "
                             f"(pairs {[g.pair_id for g in groups][:3]}...)")
        rewards_BG = torch.tensor([[r.total for r in group] for group in rewards], dtype=torch.float64)
        return group_advantages(rewards_BG, self.advantage_scaling).to(torch.float32).numpy()

