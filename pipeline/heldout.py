"""Held-out evaluation during training: greedy answers of the current policy on pairs it never trains on.

Synthetic data is held out by seed (the training stream's seed + `HELDOUT_SEED_OFFSET`); a dataset by
split (`data.eval_split`). The metric is the fraction of pairs whose parsed answer is the preferred image
(an unparsable answer counts as wrong, as in the ImageReward protocol), plus the format rate.
"""

from __future__ import annotations

from pipeline.config import DataConfig, ModelConfig
from pipeline.data import PairSource
from pipeline.prompts import parse_completion
from pipeline.rewards import accuracy_reward
from pipeline.types import PreferencePair, RolloutGroup

HELDOUT_SEED_OFFSET = 1_000_003


def heldout_pairs(data: DataConfig, model: ModelConfig) -> list[PreferencePair]:
    """The first `data.eval_pairs` held-out pairs (the same ones at every evaluation)."""
    if data.eval_pairs == 0:
        return []
    if data.source == "synthetic":
        held = data.model_copy(update={"seed": data.seed + HELDOUT_SEED_OFFSET})
        return PairSource.from_config(held, model).next_batch(data.eval_pairs)
    held = data.model_copy(update={"split": data.eval_split, "streaming": False})
    return PairSource.from_config(held, model, loop=False).next_batch(data.eval_pairs)


def heldout_metrics(groups: list[RolloutGroup]) -> dict[str, float]:
    """eval/accuracy and eval/format_rate of one greedy completion per pair."""
    answers = [(parse_completion(g.completions[0].text).answer, g.pair.preferred) for g in groups]
    if not answers:
        return {}
    return {"eval/accuracy": sum(accuracy_reward(a, p) for a, p in answers) / len(answers),
            "eval/format_rate": sum(a is not None for a, _ in answers) / len(answers)}
