"""pipeline/grpo.py: every option against values worked out by hand, and the batch-invariance properties."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.grpo import (
    LossNormalizer,
    aggregate,
    clipped_surrogate,
    combine_metrics,
    group_advantages,
    grpo_loss,
    importance_ratio,
    kl_penalty,
    tis_weight,
)

LN2 = math.log(2.0)
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "constant")
FAST = settings(max_examples=20, deadline=None)
THOROUGH = settings(max_examples=40, deadline=None)  # cheap and central: batch invariance, masking


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- advantages ---------------------------------------------------------------------------------------

def test_group_scaling_by_hand():
    # group [1, 0, 1, 0]: mean 0.5, population std 0.5 -> [1, -1, 1, -1]; group [2, 2, 2, 2] -> 0 / eps = 0
    adv = group_advantages(t([[1, 0, 1, 0], [2, 2, 2, 2]]), "group", eps=1e-12)
    torch.testing.assert_close(adv, t([[1, -1, 1, -1], [0, 0, 0, 0]]))


def test_batch_scaling_by_hand():
    # centred by group mean: [[.5, -.5], [0, 0]]; batch [1, 0, 3, 3]: mean 1.75,
    # variance (.75^2 + 1.75^2 + 1.25^2 + 1.25^2) / 4 = 6.75 / 4 = 1.6875, std 1.2990381
    adv = group_advantages(t([[1, 0], [3, 3]]), "batch", eps=0.0)
    torch.testing.assert_close(adv, t([[0.5 / 1.2990381, -0.5 / 1.2990381], [0, 0]]))


def test_no_scaling_is_dr_grpo_centering_only():
    # means 0.5 and 4: [[.5, -.5], [-1, 1]], no division
    torch.testing.assert_close(group_advantages(t([[1, 0], [3, 5]]), "none"), t([[0.5, -0.5], [-1, 1]]))


def test_group_of_one_gets_zero_advantage():
    assert group_advantages(t([[3.0]]), "group").item() == 0.0


def test_advantage_errors():
    with pytest.raises(ValueError, match="scaling"):
        group_advantages(t([[1, 0]]), "rank")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(t([1, 0]), "group")


@FAST
@given(rewards=st.lists(st.lists(st.floats(-10, 10), min_size=2, max_size=6), min_size=1, max_size=5)
       .filter(lambda rows: len({len(r) for r in rows}) == 1),
       scaling=st.sampled_from(["group", "batch", "none"]))
def test_property_group_advantages_sum_to_zero(rewards, scaling):
    adv_BG = group_advantages(t(rewards), scaling)
    assert torch.allclose(adv_BG.sum(dim=1), torch.zeros(len(rewards), dtype=torch.float64), atol=1e-6)


# --- per-token pieces ---------------------------------------------------------------------------------

def test_clipped_surrogate_asymmetric_by_hand():
    ratio = t([[0.5, 1.0, 1.5], [0.5, 1.0, 1.5]])
    # eps_low .2, eps_high .28 -> clip range [0.8, 1.28]
    # A=+1: max(-r, -clip r) = max([-.5, -1, -1.5], [-.8, -1, -1.28]) = [-.5, -1, -1.28]; clipped [F, F, T]
    # A=-1: max( r,  clip r) = max([ .5,  1,  1.5], [ .8,  1,  1.28]) = [ .8,  1,  1.5];  clipped [T, F, F]
    loss, clipped, dual = clipped_surrogate(ratio, t([1, -1]), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, t([[-0.5, -1.0, -1.28], [0.8, 1.0, 1.5]]))
    assert clipped.tolist() == [[False, False, True], [True, False, False]]
    assert not dual.any()


def test_dual_clip_bounds_negative_advantage_by_hand():
    # A=-1, c=3: ratio 4 -> max(4, 1.28) = 4 > 3 = -c A -> 3 (dual clipped); ratio 2 -> 2 (< 3, kept);
    # A=+1 is never dual clipped: ratio 4 -> max(-4, -1.28) = -1.28
    ratio = t([[4.0, 2.0], [4.0, 2.0]]).requires_grad_()
    loss, _, dual = clipped_surrogate(ratio, t([-1, 1]), 0.2, 0.28, dual_clip=3.0)
    torch.testing.assert_close(loss, t([[3.0, 2.0], [-1.28, -1.28]]))
    assert dual.tolist() == [[True, False], [False, False]]
    loss.sum().backward()
    # d/dr: dual-clipped 0; unclipped -A = 1; clipped 0
    torch.testing.assert_close(ratio.grad, t([[0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(ratio, t([-1, 1]), 0.2, 0.28, dual_clip=1.0)


def test_tis_weight_caps_and_detaches():
    old = t([[math.log(0.5), math.log(0.25)]]).requires_grad_()
    rollout = t([[math.log(0.25), math.log(0.5)]])
    w = tis_weight(old, rollout, cap=1.5)  # ratios 2 -> capped 1.5, and 0.5
    torch.testing.assert_close(w, t([[1.5, 0.5]]))
    assert not w.requires_grad


def test_kl_estimators_by_hand():
    logp, ref = t([[math.log(0.5), -1.0]]), t([[math.log(0.25), -1.0]])
    # k1 = log p - log ref = log 2, 0;  k3 = ref/p - log(ref/p) - 1 = .5 + log 2 - 1 = 0.1931472, 0
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), t([[LN2, 0.0]]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), t([[0.5 + LN2 - 1.0, 0.0]]))
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, "k2")  # type: ignore[arg-type]


def test_importance_ratio():
    torch.testing.assert_close(importance_ratio(t([[0.0]]), t([[-LN2]])), t([[2.0]]))


def test_aggregations_by_hand():
    values = t([[1, 2, 3], [4, 9, 9]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # the 9s are padding
    whole = LossNormalizer(total_tokens=4, total_sequences=2, max_tokens=5)
    # token mean 10/4; seq mean (6/3 + 4/1)/2 = 3; constant 10/(2*5) = 1
    assert aggregate(values, mask, whole, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(values, mask, whole, "seq_mean_token_mean").item() == pytest.approx(3.0)
    assert aggregate(values, mask, whole, "constant").item() == pytest.approx(1.0)
    # the same rows as one micro-batch of a batch of 8 tokens, 4 sequences: 10/8, 6/4, 10/20
    bigger = LossNormalizer(total_tokens=8, total_sequences=4, max_tokens=5)
    assert aggregate(values, mask, bigger, "token_mean").item() == pytest.approx(1.25)
    assert aggregate(values, mask, bigger, "seq_mean_token_mean").item() == pytest.approx(1.5)
    assert aggregate(values, mask, bigger, "constant").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate(values, mask, whole, "sum")  # type: ignore[arg-type]


def test_normalizer_from_lengths_and_validation():
    assert LossNormalizer.from_lengths([3, 1, 0], max_tokens=8) == LossNormalizer(4, 3, 8)
    with pytest.raises(ValueError):
        LossNormalizer(total_tokens=1, total_sequences=1, max_tokens=0)


# --- the full loss by hand ----------------------------------------------------------------------------
# B=2, T=2, A=[+1, -1]; ratios [[1.5, 1.0], [0.5, (padding)]]; clip range [0.8, 1.28].
# Per token: (A=+1, r=1.5) -> -1.28 clipped; (A=+1, r=1) -> -1; (A=-1, r=.5) -> max(.5, .8) = .8 clipped.
OLD = t([[-1.0, -2.0], [-0.5, -3.0]])
RATIO = t([[1.5, 1.0], [0.5, 1.0]])
MASK = torch.tensor([[True, True], [True, False]])
ADV = t([1.0, -1.0])
NORM = LossNormalizer(total_tokens=3, total_sequences=2, max_tokens=4)
CLIP = dict(eps_low=0.2, eps_high=0.28)


def hand_logp(garbage: float = -math.inf) -> torch.Tensor:
    logp = OLD + torch.log(RATIO)
    logp[1, 1] = garbage  # padding may hold anything
    return logp.requires_grad_()


@pytest.mark.parametrize("loss_agg, expected", [
    ("token_mean", (-1.28 - 1.0 + 0.8) / 3),  # -1.48 / 3 = -0.49333
    ("seq_mean_token_mean", ((-1.28 - 1.0) / 2 + 0.8 / 1) / 2),  # (-1.14 + .8) / 2 = -0.17
    ("constant", (-1.28 - 1.0 + 0.8) / (2 * 4)),  # -1.48 / 8 = -0.185
])
def test_grpo_loss_by_hand(loss_agg, expected):
    logp = hand_logp()
    loss, m = grpo_loss(logp, OLD, ADV, MASK, NORM, **CLIP, loss_agg=loss_agg)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # only the unclipped token (0, 1) has gradient: d(-A r)/dlogp = -A r = -1, times its aggregation weight
    weight = {"token_mean": 1 / 3, "seq_mean_token_mean": 1 / 2 / 2, "constant": 1 / 8}[loss_agg]
    torch.testing.assert_close(logp.grad, t([[0.0, -weight], [0.0, 0.0]]))
    assert m["clip_fraction"].item() == pytest.approx(2 / 3)
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 1.0 + 0.5) / 3)
    assert (m["ratio_min"].item(), m["ratio_max"].item()) == pytest.approx((0.5, 1.5))
    # approx_kl = mean of r - log r - 1: (1.5 - log 1.5 - 1) + 0 + (.5 + log 2 - 1) = .0945349 + .1931472
    assert m["approx_kl"].item() == pytest.approx((0.0945349 + 0.1931472) / 3, abs=1e-6)
    assert m["pg_loss"].item() == pytest.approx(expected)
    assert not any(v.requires_grad for v in m.values())
    assert "kl" not in m and "logprob_mismatch" not in m and "dual_clip_fraction" not in m


def test_grpo_loss_dual_clip_by_hand():
    # row 1 ratio 4 with A=-1 and c=3: max(4, 1.28) = 4 -> bounded at 3; token mean (-1.28 - 1 + 3) / 3
    ratio = RATIO.clone()
    ratio[1, 0] = 4.0
    logp = (OLD + torch.log(ratio)).requires_grad_()
    loss, m = grpo_loss(logp, OLD, ADV, MASK, NORM, **CLIP, dual_clip=3.0)
    assert loss.item() == pytest.approx((-1.28 - 1.0 + 3.0) / 3)
    assert m["dual_clip_fraction"].item() == pytest.approx(1 / 3)


def test_grpo_loss_tis_by_hand():
    # rollout = old - log w, so w = exp(old - rollout) = [[2 -> capped 1.5, .5], [1, -]]
    # token loss * w: -1.28 * 1.5 = -1.92, -1 * .5 = -.5, .8 * 1 = .8 -> token mean -1.62 / 3 = -0.54
    rollout = OLD - torch.log(t([[2.0, 0.5], [1.0, 7.0]]))
    loss, m = grpo_loss(hand_logp(), OLD, ADV, MASK, NORM, **CLIP, rollout_logp_BT=rollout, tis_cap=1.5)
    assert loss.item() == pytest.approx(-0.54)
    assert m["tis_weight_mean"].item() == pytest.approx((1.5 + 0.5 + 1.0) / 3)
    assert m["tis_capped_fraction"].item() == pytest.approx(1 / 3)
    # |old - rollout| = log 2, log 2, 0 -> 2 log 2 / 3
    assert m["logprob_mismatch"].item() == pytest.approx(2 * LN2 / 3)
    # rollout_kl = k3 of KL(rollout || old): old/rollout = 2 -> 2 - log 2 - 1; 0.5 -> .5 + log 2 - 1; 1 -> 0
    assert m["rollout_kl"].item() == pytest.approx((1 - LN2 + LN2 - 0.5) / 3)


def test_grpo_loss_rollout_without_cap_only_logs():
    rollout = OLD - LN2
    loss, m = grpo_loss(hand_logp(), OLD, ADV, MASK, NORM, **CLIP, rollout_logp_BT=rollout)
    assert loss.item() == pytest.approx(-1.48 / 3)
    assert m["logprob_mismatch"].item() == pytest.approx(LN2)
    assert "tis_weight_mean" not in m


@pytest.mark.parametrize("estimator, kl_token", [("k1", LN2), ("k3", 0.5 + LN2 - 1.0)])
def test_grpo_loss_kl_by_hand(estimator, kl_token):
    # ref = logp - log 2 everywhere: per token k1 = log 2, k3 = .5 + log 2 - 1; loss = pg + .1 * mean kl
    logp = hand_logp()
    ref = logp.detach() - LN2
    loss, m = grpo_loss(logp, OLD, ADV, MASK, NORM, **CLIP, ref_logp_BT=ref, kl_coef=0.1, kl_estimator=estimator)
    assert loss.item() == pytest.approx(-1.48 / 3 + 0.1 * kl_token)
    assert m["kl"].item() == pytest.approx(kl_token)
    assert m["pg_loss"].item() == pytest.approx(-1.48 / 3)


def test_kl_coef_zero_needs_no_reference_and_only_logs_one():
    base, _ = grpo_loss(hand_logp(), OLD, ADV, MASK, NORM, **CLIP)
    logged, m = grpo_loss(hand_logp(), OLD, ADV, MASK, NORM, **CLIP, ref_logp_BT=OLD - LN2, kl_coef=0.0)
    assert logged.item() == base.item() and "kl" in m


def test_grpo_loss_errors():
    logp = hand_logp()
    with pytest.raises(ValueError, match="ref_logp_BT"):
        grpo_loss(logp, OLD, ADV, MASK, NORM, **CLIP, kl_coef=0.1)
    with pytest.raises(ValueError, match="rollout_logp_BT"):
        grpo_loss(logp, OLD, ADV, MASK, NORM, **CLIP, tis_cap=2.0)
    with pytest.raises(ValueError, match="mask_BT"):
        grpo_loss(logp, OLD, ADV, MASK[:, :1], NORM, **CLIP)
    with pytest.raises(ValueError, match="advantages_B"):
        grpo_loss(logp, OLD, ADV[:1], MASK, NORM, **CLIP)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(logp, OLD, ADV, MASK, NORM, **CLIP, kl_coef=-1.0)


def test_combine_metrics_matches_whole_batch():
    parts = [grpo_loss(hand_logp()[i:i + 1], OLD[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], NORM, **CLIP)[1]
             for i in range(2)]
    whole = grpo_loss(hand_logp(), OLD, ADV, MASK, NORM, **CLIP)[1]
    combined = combine_metrics(parts)
    assert combined.keys() == whole.keys()
    for name, value in whole.items():
        assert combined[name] == pytest.approx(value.item()), name


def test_all_padding_micro_batch_is_neutral():
    loss, m = grpo_loss(t([[-math.inf]]).requires_grad_(), t([[0.0]]), t([1.0]), torch.tensor([[False]]),
                        NORM, **CLIP)
    assert loss.item() == 0.0 and m["ratio_min"].item() == math.inf and m["ratio_max"].item() == -math.inf


# --- properties ---------------------------------------------------------------------------------------

def random_batch(seed: int, B: int, T: int):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(B, T, generator=g) < 0.7
    return dict(
        old=old,
        delta=torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3,
        feat=torch.randn(B, T, generator=g, dtype=torch.float64),
        rollout=old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2,
        ref=old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.2,
        adv=torch.randn(B, generator=g, dtype=torch.float64),
        mask=mask,
    )


OPTIONS = st.fixed_dictionaries({
    "dual_clip": st.sampled_from([None, 1.5]),
    "tis_cap": st.sampled_from([None, 1.1]),
    "kl_coef": st.sampled_from([0.0, 0.1]),
    "kl_estimator": st.sampled_from(["k1", "k3"]),
    "loss_agg": st.sampled_from(LOSS_AGGS),
})


def run_loss(d, rows: slice, w: torch.Tensor, normalizer: LossNormalizer, opts: dict, pad: int = 0):
    """Loss of the rows `rows`, as one micro-batch padded with `pad` extra garbage columns."""
    def cut(x):
        x = x[rows]
        return torch.cat([x, torch.full((x.shape[0], pad), -math.inf, dtype=x.dtype)], dim=1) if pad else x
    mask = torch.cat([d["mask"][rows], torch.zeros(d["mask"][rows].shape[0], pad, dtype=torch.bool)], dim=1)
    logp = cut(d["old"] + d["delta"] + w * d["feat"])
    tis = {"rollout_logp_BT": cut(d["rollout"])} if opts["tis_cap"] else {}
    kl = {"ref_logp_BT": cut(d["ref"])} if opts["kl_coef"] else {}
    return grpo_loss(logp, cut(d["old"]), d["adv"][rows], mask, normalizer, eps_low=0.2, eps_high=0.28,
                     dual_clip=opts["dual_clip"], tis_cap=opts["tis_cap"], kl_coef=opts["kl_coef"],
                     kl_estimator=opts["kl_estimator"], loss_agg=opts["loss_agg"], **tis, **kl)


@THOROUGH
@given(seed=st.integers(0, 10_000), B=st.integers(2, 6), T=st.integers(1, 5), opts=OPTIONS,
       cuts=st.lists(st.integers(1, 5), min_size=1, max_size=3), pads=st.lists(st.integers(0, 2), min_size=4))
def test_property_micro_batches_and_ranks_match_whole_batch(seed, B, T, opts, cuts, pads):
    d = random_batch(seed, B, T)
    d["delta"].requires_grad_()
    norm = LossNormalizer(int(d["mask"].sum()), B, max_tokens=T + 2)
    w_whole = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    whole, _ = run_loss(d, slice(0, B), w_whole, norm, opts)
    whole.backward()
    grad_delta_whole, d["delta"].grad = d["delta"].grad.clone(), None

    # k micro-batches with their own padding, on 2 simulated ranks: each rank its own copy of w,
    # losses and gradients summed across ranks (all-reduce SUM)
    bounds = sorted({0, B, *(c for c in cuts if c < B)})
    half = B // 2
    bounds = sorted(set(bounds) | {half})
    w_ranks = [torch.tensor(0.1, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    total = torch.zeros((), dtype=torch.float64)
    for i, (start, stop) in enumerate(zip(bounds, bounds[1:])):
        loss, _ = run_loss(d, slice(start, stop), w_ranks[start >= half], norm, opts, pad=pads[i % len(pads)])
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole.detach())
    torch.testing.assert_close(d["delta"].grad, grad_delta_whole)
    torch.testing.assert_close(w_ranks[0].grad + w_ranks[1].grad, w_whole.grad)


@FAST
@given(seed=st.integers(0, 10_000), B=st.integers(1, 6), T=st.integers(1, 5),
       loss_agg=st.sampled_from(LOSS_AGGS))
def test_property_ratio_one_is_the_plain_policy_gradient(seed, B, T, loss_agg):
    d = random_batch(seed, B, T)
    mask, adv = d["mask"], d["adv"]
    norm = LossNormalizer(int(mask.sum()), B, max_tokens=T)
    loss, _ = grpo_loss(d["old"].clone(), d["old"], adv, mask, norm, eps_low=0.2, eps_high=0.28, loss_agg=loss_agg)
    lengths = mask.sum(dim=1).double()
    # ratio 1 is inside every clip range: each token's loss is -A
    expected = {
        "token_mean": -(adv * lengths).sum() / max(int(lengths.sum()), 1),
        "seq_mean_token_mean": -(adv * (lengths > 0)).sum() / B,
        "constant": -(adv * lengths).sum() / (B * T),
    }[loss_agg]
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)


@THOROUGH
@given(seed=st.integers(0, 10_000), B=st.integers(1, 5), T=st.integers(1, 5), opts=OPTIONS,
       garbage=st.sampled_from([-math.inf, math.nan, 1e6, 0.0]))
def test_property_masked_tokens_get_exactly_zero_gradient(seed, B, T, opts, garbage):
    d = random_batch(seed, B, T)
    logp = (d["old"] + d["delta"]).masked_fill(~d["mask"], garbage).requires_grad_()
    fill = {name: d[name].masked_fill(~d["mask"], garbage) for name in ("old", "rollout", "ref")}
    norm = LossNormalizer(max(int(d["mask"].sum()), 1), B, max_tokens=T)
    loss, _ = grpo_loss(logp, fill["old"], d["adv"], d["mask"], norm, eps_low=0.2, eps_high=0.28,
                        dual_clip=opts["dual_clip"], rollout_logp_BT=fill["rollout"], tis_cap=opts["tis_cap"],
                        ref_logp_BT=fill["ref"], kl_coef=opts["kl_coef"], kl_estimator=opts["kl_estimator"],
                        loss_agg=opts["loss_agg"])
    loss.backward()
    assert torch.isfinite(loss)
    assert (logp.grad[~d["mask"]] == 0).all()
    assert torch.isfinite(logp.grad).all()


# --- purity -------------------------------------------------------------------------------------------
# A fresh interpreter imports the pure modules; it is started when this file is collected so that its
# torch import (about 2 s) overlaps the other tests instead of adding to them.
_PURITY_CODE = ("import sys, pipeline.grpo, pipeline.rewards, actors.reward\n"
                "heavy = sorted(m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules)\n"
                "assert not heavy, heavy\n")
_PURITY_CHECK = subprocess.Popen([sys.executable, "-c", _PURITY_CODE], cwd=Path(__file__).resolve().parents[2],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_pure_modules_import_no_heavy_frameworks():
    _, stderr = _PURITY_CHECK.communicate(timeout=60)
    assert _PURITY_CHECK.returncode == 0, stderr
