"""Held-out evaluation during training: greedy answers of the current policy on pairs it never trains on.

Synthetic data is held out by seed (the training stream's seed + `HELDOUT_SEED_OFFSET`); a dataset by
split (`data.eval_split`). The metric is the fraction of pairs whose parsed answer is the preferred image
(an unparsable answer counts as wrong, as in the ImageReward protocol), plus the format rate.
"""

from __future__ import annotations

from pipeline.config import ConfigError, DataConfig, ModelConfig
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


def ood_heldout_pairs(data: DataConfig, model: ModelConfig) -> list[PreferencePair]:
    """`data.eval_pairs` held-out pairs of the out-of-distribution task `data.ood_task` ([] when off)."""
    if not data.ood_task:
        return []
    if data.source != "synthetic":
        raise ConfigError(f"data.ood_task={data.ood_task!r} needs data.source=synthetic, not {data.source!r}")
    return heldout_pairs(data.model_copy(update={"synthetic_task": data.ood_task}), model)


def heldout_metrics(groups: list[RolloutGroup], prefix: str = "eval") -> dict[str, float]:
    """PREFIX/accuracy and PREFIX/format_rate of one greedy completion per pair."""
    answers = [(parse_completion(g.completions[0].text).answer, g.pair.preferred) for g in groups]
    if not answers:
        return {}
    return {f"{prefix}/accuracy": sum(accuracy_reward(a, p) for a, p in answers) / len(answers),
            f"{prefix}/format_rate": sum(a is not None for a, _ in answers) / len(answers)}
