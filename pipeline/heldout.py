"""Held-out evaluation during training: greedy answers of the current policy on pairs it never trains on.

Synthetic data is held out by seed (the training stream's seed + `HELDOUT_SEED_OFFSET`); a dataset by
split (`data.eval_split`). The metric is the fraction of pairs whose parsed answer is the preferred image
(an unparsable answer counts as wrong, as in the ImageReward protocol), plus the format rate and the
accuracy among well-formed answers. With the listener's scores of the same completions: the agreement
split (`pipeline.rewards.agreement_metrics`: accuracy when the listener agrees with the answer vs when it
contradicts it) and its mean p(preferred), as PREFIX/listener/*; on synthetic pairs, optionally the oracle
faithfulness of the reasonings (PREFIX/faithful). `eval_table` keeps the completions themselves, so another
listener can score them later (bench.learning's agreement listener).
"""

from __future__ import annotations

from pipeline.config import ConfigError, DataConfig, ModelConfig
from pipeline.data import PairSource
from pipeline.prompts import mask_answer, parse_completion
from pipeline.rewards import accuracy_reward, agreement_metrics, faithfulness
from pipeline.synthetic import describe_synthetic_image
from pipeline.types import ListenerScore, PreferencePair, RolloutGroup

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


def heldout_metrics(groups: list[RolloutGroup], prefix: str = "eval", scores: list[ListenerScore] | None = None,
                    with_faithfulness: bool = False) -> dict[str, float]:
    """PREFIX/accuracy, format_rate and accuracy_well_formed of one greedy completion per pair; with `scores`
    (one per group, in order) PREFIX/listener/{agree_rate, contradiction_rate, accuracy_when_agree,
    accuracy_when_contradict, judged, p_preferred}; PREFIX/faithful (mean over well-formed answers)."""
    answers = [(parse_completion(g.completions[0].text).answer, g.pair.preferred) for g in groups]
    if not answers:
        return {}
    formed = [a == p for a, p in answers if a is not None]
    nan = float("nan")
    metrics = {f"{prefix}/accuracy": sum(accuracy_reward(a, p) for a, p in answers) / len(answers),
               f"{prefix}/format_rate": len(formed) / len(answers),
               f"{prefix}/accuracy_well_formed": sum(formed) / len(formed) if formed else nan}
    if scores is not None:
        if len(scores) != len(groups):
            raise ValueError(f"{len(scores)} listener scores for {len(groups)} evaluated pairs")
        agreement = agreement_metrics((a, s, p) for (a, p), s in zip(answers, scores))
        metrics |= {f"{prefix}/listener/{k}": v for k, v in agreement.items()}
        usable = [s.p_preferred for s in scores if s.usable]
        metrics[f"{prefix}/listener/p_preferred"] = sum(usable) / len(usable) if usable else nan
    if with_faithfulness:
        rates = [faithfulness(mask_answer(g.completions[0].text), (describe_synthetic_image(g.pair.image_1),
                                                                    describe_synthetic_image(g.pair.image_2)))
                 for g, (a, _) in zip(groups, answers) if a is not None]
        metrics[f"{prefix}/faithful"] = sum(rates) / len(rates) if rates else nan
    return metrics


def eval_table(groups: list[RolloutGroup], scores: list[ListenerScore] | None = None) -> dict[str, list]:
    """Columns of an evaluation's completions (one per pair): pair_id, prompt, text, answer, preferred and
    the listener's p(preferred) (NaN without scores)."""
    answers = [parse_completion(g.completions[0].text).answer for g in groups]
    return {"pair_id": [g.pair_id for g in groups], "prompt": [g.pair.prompt for g in groups],
            "text": [g.completions[0].text for g in groups], "answer": answers,
            "preferred": [g.pair.preferred for g in groups],
            "listener_p_preferred": [s.p_preferred if s.usable else float("nan") for s in scores]
            if scores is not None else [float("nan")] * len(groups)}
