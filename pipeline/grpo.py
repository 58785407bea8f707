"""GRPO math: group-relative advantages, the clipped policy loss, KL to a reference, loss aggregation
(and the SFT negative log-likelihood of the format warm start, aggregated the same way).

Pure torch (no ray, vllm or deepspeed). The learner (`actors/learner.py`) and the reward aggregator
(`actors/reward.py`) import these functions; every formula is written once, here.

Shapes are in the names: B sequences (one completion each), T completion tokens (right-padded, `mask_BT`
marks the real ones), G completions per group.

Batch invariance. `grpo_loss` returns one micro-batch's *additive contribution* to the loss of the whole
step: every aggregation divides by counts of the whole batch (`LossNormalizer`, summed over all
micro-batches and data-parallel ranks), so summing the returned losses over micro-batches and ranks gives
exactly the loss of the whole batch computed at once, and the summed gradients are its gradient. The
learner must therefore *sum* gradients: DeepSpeed 0.19 by default divides the loss by
`gradient_accumulation_steps` in `engine.backward` (pass `scale_wrt_gas=False`) and its gradient reduction
averages over data-parallel ranks at every ZeRO stage (multiply the loss by `world_size` before backward).

Each row of a micro-batch is one whole sequence (its length, for "seq_mean_token_mean", is counted from
its mask); packing several sequences into one row is not supported here.

Metrics are detached and additive too: `pg_loss` is aggregated like the loss, the others except
`ratio_min`/`ratio_max` are token means whose denominator is `normalizer.total_tokens`, so summing over
micro-batches and ranks gives the batch's values; `ratio_min`/`ratio_max` combine by min/max
(`METRIC_REDUCTIONS`, `combine_metrics`).

Choices where implementations differ (docs/method.md leaves them open):
- std is the population std (ddof 0), so a group of one gets advantage 0, not NaN; "batch" scaling keeps
  the per-group mean and divides by the std of all rewards of the batch (Lite PPO); "none" is Dr. GRPO.
- The truncated importance-sampling (TIS) weight min(exp(old - rollout), cap) multiplies the policy term
  only, not the KL term, and is detached (it corrects the sampling distribution, it is not optimised).
- Masked (padding) positions may hold anything, even -inf: inputs are zeroed there before any
  arithmetic, so they contribute nothing and get exactly zero gradient.

Run the tests: `.venv/bin/python -m pytest tests/unit/test_grpo.py`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

AdvantageScaling = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k3"]
LossAgg = Literal["token_mean", "seq_mean_token_mean", "constant"]

# How each metric of `grpo_loss` combines across micro-batches and ranks; unlisted metrics are summed.
METRIC_REDUCTIONS: dict[str, Literal["sum", "min", "max"]] = {"ratio_min": "min", "ratio_max": "max"}
_REDUCERS = {"sum": operator.add, "min": min, "max": max}


@dataclass(frozen=True)
class LossNormalizer:
    """Counts over the WHOLE batch (all micro-batches, all data-parallel ranks)."""

    total_tokens: int  # valid completion tokens in the batch
    total_sequences: int  # sequences in the batch
    max_tokens: int  # Dr. GRPO constant: generation budget (max_new_tokens) per sequence

    def __post_init__(self) -> None:
        if self.total_tokens < 0 or self.total_sequences < 0 or self.max_tokens <= 0:
            raise ValueError(f"bad LossNormalizer {self}: counts must be >= 0 and max_tokens > 0")

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], max_tokens: int) -> "LossNormalizer":
        """From the completion lengths of every sequence of the batch (e.g. a `TrainBatch`)."""
        return cls(total_tokens=int(sum(lengths)), total_sequences=len(lengths), max_tokens=max_tokens)


def group_advantages(rewards_BG: torch.Tensor, scaling: AdvantageScaling, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (std + eps) -> [B, G]; std of the group, of the whole batch, or none (Dr. GRPO)."""
    if rewards_BG.ndim != 2:
        raise ValueError(f"rewards_BG must be [B, G], got shape {tuple(rewards_BG.shape)}")
    centered_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    if scaling == "none":
        return centered_BG
    if scaling == "group":
        std = rewards_BG.std(dim=1, keepdim=True, correction=0)  # [B, 1]
    elif scaling == "batch":
        std = rewards_BG.std(correction=0)  # scalar
    else:
        raise ValueError(f"unknown advantage scaling {scaling!r}; expected 'group', 'batch' or 'none'")
    return centered_BG / (std + eps)


def importance_ratio(logp_BT: torch.Tensor, base_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token probability ratio p / p_base = exp(logp - base_logp)."""
    return torch.exp(logp_BT - base_logp_BT)


def clipped_surrogate(
    ratio_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), optionally dual-clipped.

    Dual clip (c > 1): for A < 0 the loss is also bounded above by -c A, so a huge ratio on a bad token
    cannot blow the update up. Returns (loss_BT, clipped_BT, dual_clipped_BT); the two masks mark the
    tokens whose clipped branch is active (zero gradient), for metrics.
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    adv_B1 = advantages_B.unsqueeze(1)
    unclipped_BT = -adv_B1 * ratio_BT
    clipped_BT = -adv_B1 * ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    is_clipped_BT = clipped_BT > unclipped_BT
    is_dual_BT = torch.zeros_like(is_clipped_BT)
    if dual_clip is not None:
        bound_B1 = -dual_clip * adv_B1
        is_dual_BT = (adv_B1 < 0) & (loss_BT > bound_B1)
        loss_BT = torch.where(is_dual_BT, bound_B1.expand_as(loss_BT), loss_BT)
    return loss_BT, is_clipped_BT, is_dual_BT


def tis_weight(old_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weight min(p_old / p_rollout, cap), detached: corrects for the rollout engine
    sampling from a slightly different distribution than the learner computes (precision, kernels)."""
    return importance_ratio(old_logp_BT, rollout_logp_BT).clamp(max=cap).detach()


def kl_penalty(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(p || ref) from tokens sampled from p (Schulman's k1 and k3).

    k1 = log p - log ref (unbiased, high variance, can be negative);
    k3 = ref/p - log(ref/p) - 1 (unbiased, low variance, always >= 0).
    """
    if estimator == "k1":
        return logp_BT - ref_logp_BT
    if estimator == "k3":
        return importance_ratio(ref_logp_BT, logp_BT) - (ref_logp_BT - logp_BT) - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def aggregate(
    values_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: LossNormalizer, loss_agg: LossAgg
) -> torch.Tensor:
    """This micro-batch's additive share of the batch's aggregate of per-token values (a scalar).

    token_mean:          sum of valid tokens / total_tokens
    seq_mean_token_mean: sum over sequences of (the sequence's token mean) / total_sequences
    constant:            sum of valid tokens / (total_sequences * max_tokens)   (Dr. GRPO)
    Each row must be a whole sequence (its length is counted from this mask).
    """
    mask_BT = mask_BT.bool()
    masked_BT = torch.where(mask_BT, values_BT, torch.zeros_like(values_BT))
    if loss_agg == "token_mean":
        return masked_BT.sum() / max(normalizer.total_tokens, 1)
    if loss_agg == "seq_mean_token_mean":
        lengths_B = mask_BT.sum(dim=1).clamp(min=1).to(values_BT.dtype)
        return (masked_BT.sum(dim=1) / lengths_B).sum() / max(normalizer.total_sequences, 1)
    if loss_agg == "constant":
        return masked_BT.sum() / (max(normalizer.total_sequences, 1) * normalizer.max_tokens)
    raise ValueError(f"unknown loss_agg {loss_agg!r}; expected 'token_mean', 'seq_mean_token_mean' or 'constant'")


def grpo_loss(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    normalizer: LossNormalizer,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    rollout_logp_BT: torch.Tensor | None = None,
    tis_cap: float | None = None,
    ref_logp_BT: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    loss_agg: LossAgg = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's additive contribution to the GRPO loss of the whole batch, and its metrics.

    logp_BT: the learner's logprobs now (with grad); old_logp_BT: the learner's logprobs before this
    step's updates (constant); rollout_logp_BT: the rollout engine's, for TIS (with `tis_cap`) and the
    mismatch metrics; ref_logp_BT: the frozen reference's, needed only when kl_coef > 0 (given with
    kl_coef 0 it is only logged). Pass float32 logprobs: ratios of bf16 logprobs are too coarse.
    See the module docstring for how losses and metrics combine.
    """
    _check_inputs(logp_BT, old_logp_BT, advantages_B, mask_BT, rollout_logp_BT, ref_logp_BT)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logp_BT is None:
        raise ValueError("kl_coef > 0 needs ref_logp_BT (the reference model's logprobs)")
    if tis_cap is not None and rollout_logp_BT is None:
        raise ValueError("tis_cap needs rollout_logp_BT (the rollout engine's logprobs)")
    mask_BT = mask_BT.bool()
    logp_BT = _zero_masked(logp_BT, mask_BT)
    old_logp_BT = _zero_masked(old_logp_BT, mask_BT).detach()
    ratio_BT = importance_ratio(logp_BT, old_logp_BT)
    pg_BT, clipped_BT, dual_BT = clipped_surrogate(ratio_BT, advantages_B.detach(), eps_low, eps_high, dual_clip)

    def token_mean(values_BT: torch.Tensor) -> torch.Tensor:
        return aggregate(values_BT.detach().to(logp_BT.dtype), mask_BT, normalizer, "token_mean")

    metrics = {
        "clip_fraction": token_mean(clipped_BT),
        "approx_kl": token_mean(kl_penalty(old_logp_BT, logp_BT, "k3")),  # KL(old || new), sampled from old
        **_ratio_metrics(ratio_BT.detach(), mask_BT, token_mean),
    }
    if dual_clip is not None:
        metrics["dual_clip_fraction"] = token_mean(dual_BT)
    if rollout_logp_BT is not None:
        rollout_logp_BT = _zero_masked(rollout_logp_BT, mask_BT).detach()
        metrics["logprob_mismatch"] = token_mean((old_logp_BT - rollout_logp_BT).abs())
        metrics["rollout_kl"] = token_mean(kl_penalty(rollout_logp_BT, old_logp_BT, "k3"))
        if tis_cap is not None:
            weight_BT = tis_weight(old_logp_BT, rollout_logp_BT, tis_cap)
            metrics["tis_weight_mean"] = token_mean(weight_BT)
            metrics["tis_capped_fraction"] = token_mean(weight_BT >= tis_cap)
            pg_BT = pg_BT * weight_BT
    metrics["pg_loss"] = aggregate(pg_BT.detach(), mask_BT, normalizer, loss_agg)
    loss_BT = pg_BT
    if ref_logp_BT is not None:
        kl_BT = kl_penalty(logp_BT, _zero_masked(ref_logp_BT, mask_BT).detach(), kl_estimator)
        metrics["kl"] = token_mean(kl_BT)
        if kl_coef > 0:
            loss_BT = loss_BT + kl_coef * kl_BT
    return aggregate(loss_BT, mask_BT, normalizer, loss_agg), metrics


def sft_loss(logp_BT: torch.Tensor, mask_BT: torch.Tensor, normalizer: LossNormalizer) -> torch.Tensor:
    """This micro-batch's additive share of the batch's token-mean negative log-likelihood (a scalar).

    Supervised fine-tuning on target completions (`python -m pipeline sft`): the same aggregation and the
    same whole-batch normaliser as the GRPO loss, so micro-batches and ranks combine the same way.
    """
    return aggregate(-logp_BT, mask_BT, normalizer, "token_mean")


def combine_metrics(parts: Iterable[Mapping[str, torch.Tensor | float]]) -> dict[str, float]:
    """Combine `grpo_loss` metrics of micro-batches (or ranks) into the batch's, by METRIC_REDUCTIONS."""
    combined: dict[str, float] = {}
    for part in parts:
        for name, value in part.items():
            reduce = _REDUCERS[METRIC_REDUCTIONS.get(name, "sum")]
            combined[name] = float(value) if name not in combined else reduce(combined[name], float(value))
    return combined


def _ratio_metrics(ratio_BT: torch.Tensor, mask_BT: torch.Tensor, token_mean) -> dict[str, torch.Tensor]:
    # An empty micro-batch reports +inf/-inf, the identities of min/max, so combining stays exact.
    return {
        "ratio_mean": token_mean(ratio_BT),
        "ratio_min": ratio_BT.masked_fill(~mask_BT, math.inf).min() if ratio_BT.numel() else _inf(ratio_BT, 1),
        "ratio_max": ratio_BT.masked_fill(~mask_BT, -math.inf).max() if ratio_BT.numel() else _inf(ratio_BT, -1),
    }


def _inf(like: torch.Tensor, sign: int) -> torch.Tensor:
    return torch.tensor(sign * math.inf, dtype=like.dtype, device=like.device)


def _zero_masked(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    # where (not multiply): padding may hold -inf/NaN, and where's backward sends exactly 0 there.
    return torch.where(mask_BT, values_BT, torch.zeros_like(values_BT))


def _check_inputs(
    logp_BT: torch.Tensor,
    old_logp_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    rollout_logp_BT: torch.Tensor | None,
    ref_logp_BT: torch.Tensor | None,
) -> None:
    if logp_BT.ndim != 2:
        raise ValueError(f"logp_BT must be [B, T], got shape {tuple(logp_BT.shape)}")
    shape = tuple(logp_BT.shape)
    named = {"old_logp_BT": old_logp_BT, "mask_BT": mask_BT, "rollout_logp_BT": rollout_logp_BT,
             "ref_logp_BT": ref_logp_BT}
    for name, tensor in named.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} like logp_BT")
    if tuple(advantages_B.shape) != shape[:1]:
        raise ValueError(f"advantages_B has shape {tuple(advantages_B.shape)}, expected ({shape[0]},)")
