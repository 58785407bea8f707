"""The DeepSpeed learner on gloo: ranks as Ray actors on the tiny checkpoint.

One 2-rank ZeRO-3 group runs the main sequence (module fixture); a 1-rank group with a reference model
checks that the split over ranks and micro-batches does not change the loss or the gradient; a fresh 2-rank
group resumes from the checkpoint and must reproduce the next step's loss exactly; every `zero_stage`
(0, 2, 3) takes the same step as the module's group, checkpoints, resumes and exports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import AlgoConfig, LearnerConfig

pytestmark = pytest.mark.integration

# Small micro-batch budget: the 6 sequences (~110 tokens each) split into several micro-batches per rank.
LEARNER = LearnerConfig(num_ranks=2, lr=1e-4, micro_batch_tokens=256, num_cpus=1, freeze_vision=True,
                        dtype="float32")  # compared with transformers' fp32 forward to 1e-5
ALGO = AlgoConfig()


@pytest.fixture(scope="module")
def run(ray_local, tiny_reasoner_dir, tiny_train_batch, tmp_path_factory):
    """Three steps on the same batch with a checkpoint after the first; results for the tests below."""
    from actors.learner import LearnerGroup

    group = LearnerGroup(str(tiny_reasoner_dir), LEARNER, ALGO, seed=0, max_new_tokens=64)
    try:
        before = group.gathered_state_dict(include_frozen=True)
        first = group.train_step(tiny_train_batch)
        after_one = group.gathered_state_dict(include_frozen=True)
        root = tmp_path_factory.mktemp("ckpt-root")
        info = group.save_checkpoint(str(root), step=1, data_position={"next_index": 6}, keep=1)
        second = group.train_step(tiny_train_batch)
        third = group.train_step(tiny_train_batch)
        return dict(before=before, first=first, after_one=after_one, second=second, third=third, info=info,
                    root=root)
    finally:
        group.shutdown()


def test_recomputed_logprobs_match_transformers(run) -> None:
    # Step 1 runs at the checkpoint's weights, where the batch's logprobs were computed one by one.
    assert run["first"].values["learner_rollout_logp_diff"] < 1e-4
    assert run["first"].values["micro_batches"] >= 2  # the budget forced several micro-batches per rank


def test_train_step_changes_trainable_parameters_only(run, tiny_reasoner_dir) -> None:
    before, after = run["before"], run["after_one"]
    assert before.keys() == after.keys()
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert any(name.startswith("model.layers.") for name in changed)
    assert not any(name.startswith("visual.") for name in changed)  # freeze_vision
    # The gathered weights at step 0 are the checkpoint's, under its own names.
    from safetensors.numpy import load_file

    saved = load_file(str(Path(tiny_reasoner_dir) / "model.safetensors"))
    assert saved.keys() == before.keys()
    assert all(np.array_equal(saved[name], before[name]) for name in saved)


def test_loss_falls_on_a_repeated_batch(run) -> None:
    losses = [run[k].values["loss"] for k in ("first", "second", "third")]
    # Once tokens hit the clip range their gradient is 0, so later steps need not keep falling.
    assert losses[1] < losses[0] and losses[2] < losses[0], losses
    first = run["first"].values
    assert first["grad_norm"] > 0 and first["lr"] == pytest.approx(LEARNER.lr)
    assert first["tokens_per_s"] > 0 and first["clip_fraction"] == 0.0  # ratio 1 at the rollout weights
    assert run["third"].values["clip_fraction"] > 0  # repeated steps push ratios past the clip range


def test_checkpoint_layout_and_export_loads_with_transformers(run) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(run["info"].path)
    assert path.name == "step-00000001" and run["info"].data_position == {"next_index": 6}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1 and manifest["world_size"] == 2
    assert not list(run["root"].glob(".tmp-*"))
    model = AutoModelForImageTextToText.from_pretrained(path / "policy", dtype=torch.float32)
    AutoProcessor.from_pretrained(path / "policy")
    exported = {n: p.detach().numpy() for n, p in model.named_parameters()}
    # Module names differ from checkpoint names; compare through the same mapping the sync uses.
    from actors.weight_sync import checkpoint_names

    names = checkpoint_names(model)
    assert all(np.array_equal(exported[m], run["after_one"][names[m]]) for m in exported)


def test_resume_in_a_fresh_group_reproduces_the_next_loss_exactly(run, ray_local, tiny_reasoner_dir,
                                                                   tiny_train_batch) -> None:
    from actors.learner import LearnerGroup

    group = LearnerGroup(str(tiny_reasoner_dir), LEARNER, ALGO, seed=123, max_new_tokens=64)  # other seed
    try:
        info = group.load_checkpoint(run["info"].path)
        assert info.step == 1 and info.data_position == {"next_index": 6}
        resumed = group.train_step(tiny_train_batch)
    finally:
        group.shutdown()
    assert resumed.values["loss"] == run["second"].values["loss"]
    assert resumed.values["grad_norm"] == run["second"].values["grad_norm"]


def test_split_over_ranks_and_micro_batches_and_reference_leave_step_unchanged(run, ray_local, tiny_reasoner_dir,
                                                                             tiny_train_batch) -> None:
    """1 rank, one big micro-batch, activation checkpointing, optimizer offload, kl_coef > 0 (reference ==
    policy at step 1, so k3 KL and its gradient are exactly 0): same loss and gradient norm as 2 ranks with
    small micro-batches."""
    from actors.learner import LearnerGroup

    one = LEARNER.model_copy(update={"num_ranks": 1, "micro_batch_tokens": 100_000, "activation_checkpointing": True,
                                     "offload_optimizer": True})
    group = LearnerGroup(str(tiny_reasoner_dir), one, ALGO.model_copy(update={"kl_coef": 0.1}), seed=0,
                         max_new_tokens=64)
    try:
        single = group.train_step(tiny_train_batch).values
    finally:
        group.shutdown()
    assert single["micro_batches"] == 1 and single["kl"] == pytest.approx(0.0, abs=1e-7)
    assert single["loss"] == pytest.approx(run["first"].values["loss"], rel=1e-5, abs=1e-7)
    assert single["grad_norm"] == pytest.approx(run["first"].values["grad_norm"], rel=1e-4)


@pytest.mark.parametrize(("stage", "ranks"), [(0, 1), (0, 2), (2, 2), (3, 1)])  # 2-rank ZeRO-3: `run`
def test_each_zero_stage_takes_the_same_learning_step(stage, ranks, run, ray_local, tiny_reasoner_dir,
                                                     tiny_train_batch, tmp_path) -> None:
    """A real DeepSpeed engine at each `learner.zero_stage` (gloo): from the same weights, the same loss,
    gradient norm and updated weights as the module's 2-rank ZeRO-3 step; the checkpoint it writes resumes
    exactly and its export holds the weights the step produced. With kl_coef > 0 the frozen reference is
    built at the matching stage (partitioned under 3, plain below) and equals the policy at step 1."""
    from safetensors.numpy import load_file

    from actors.learner import LearnerGroup

    cfg = LEARNER.model_copy(update={"zero_stage": stage, "num_ranks": ranks})
    group = LearnerGroup(str(tiny_reasoner_dir), cfg, ALGO.model_copy(update={"kl_coef": 0.1}), seed=0,
                         max_new_tokens=64)
    try:
        before = group.gathered_state_dict(include_frozen=True)
        first = group.train_step(tiny_train_batch).values
        after = group.gathered_state_dict(include_frozen=True)
        info = group.save_checkpoint(str(tmp_path), step=1, data_position={"next_index": 6}, keep=1)
        second = group.train_step(tiny_train_batch).values
        group.load_checkpoint(info.path)
        resumed = group.train_step(tiny_train_batch).values
    finally:
        group.shutdown()
    assert all(np.array_equal(before[name], run["before"][name]) for name in before)  # same start
    assert first["micro_batches"] >= 2 and first["learner_rollout_logp_diff"] < 1e-4
    assert first["tokens"] == run["first"].values["tokens"]
    assert first["positions"] < first["tokens"]  # shared prompts: a pair's prompt once for its two completions
    assert first["loss"] == pytest.approx(run["first"].values["loss"], rel=1e-5, abs=1e-7)
    assert first["grad_norm"] == pytest.approx(run["first"].values["grad_norm"], rel=1e-4)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert any(name.startswith("model.layers.") for name in changed)
    assert not any(name.startswith("visual.") for name in changed)  # freeze_vision at every stage
    # Adam's first step moves each weight by about lr: equal to the ZeRO-3 step within a fraction of it.
    for name in before:
        np.testing.assert_allclose(after[name], run["after_one"][name], rtol=0, atol=0.1 * LEARNER.lr, err_msg=name)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7) and second["kl"] > 0  # the reference stays at step 0
    assert resumed["loss"] == second["loss"] and resumed["grad_norm"] == second["grad_norm"]
    policy = Path(info.path) / "policy"
    exported: dict[str, np.ndarray] = {}
    for shard in policy.glob("model-*.safetensors"):
        exported.update(load_file(str(shard)))
    assert exported.keys() == after.keys() and all(np.array_equal(exported[n], after[n]) for n in after)


def test_bf16_mixed_precision_steps_near_the_fp32_step_with_bf16_weights(run, ray_local, tiny_reasoner_dir,
                                                                         tiny_train_batch, tmp_path) -> None:
    """`learner.dtype: bfloat16`, what `auto` picks on a CPU with AVX512_BF16/AMX or a bf16 GPU (forced here, so
    every machine runs it): the module's weights are bf16 (fp32 masters live in the optimizer), the
    recomputed logprobs stay near the fp32 rollout's, the gradient is the fp32 step's within bf16 noise, and
    a repeated batch still lowers the loss. The export is in the base checkpoint's dtype (fp32 here): the
    trained tensors are the learner's bf16 values, the frozen vision tower the base's own bytes."""
    import torch

    from actors.learner import LearnerGroup

    from safetensors.numpy import load_file

    cfg = LEARNER.model_copy(update={"dtype": "bfloat16", "num_ranks": 1, "zero_stage": 0})
    group = LearnerGroup(str(tiny_reasoner_dir), cfg, ALGO, seed=0, max_new_tokens=64)
    try:
        steps = [group.train_step(tiny_train_batch).values for _ in range(3)]
        after = group.gathered_state_dict(include_frozen=False)
        policy = Path(group.export_policy(str(tmp_path / "policy")))
    finally:
        group.shutdown()
    first = steps[0]
    # the tiny model's bf16 gap to fp32: mean 0.0011 nats per token (tests/unit/test_logprob_inputs.py)
    assert 0 < first["learner_rollout_logp_diff"] < 0.01
    assert first["grad_norm"] == pytest.approx(run["first"].values["grad_norm"], rel=0.05)
    assert steps[1]["loss"] < first["loss"] and steps[2]["loss"] < first["loss"], [s["loss"] for s in steps]
    trained = [name for name in after if name.startswith("model.layers.")]
    assert trained
    for name in trained:  # bf16 weights: each value survives a round trip through bfloat16 unchanged
        weights = torch.from_numpy(after[name].copy())
        assert torch.equal(weights.bfloat16().float(), weights), name
    exported: dict[str, np.ndarray] = {}
    for shard in policy.glob("model-*.safetensors"):
        exported.update(load_file(str(shard)))
    base = load_file(str(Path(tiny_reasoner_dir) / "model.safetensors"))
    assert exported.keys() == base.keys() and all(t.dtype == np.float32 for t in exported.values())
    assert all(np.array_equal(exported[n], base[n]) for n in base if n.startswith("visual."))  # frozen
    assert all(np.array_equal(exported[n], after[n]) for n in trained)  # what the engines run
    assert json.loads((policy / "config.json").read_text())["dtype"] == "float32"


def test_shared_prompts_take_the_step_of_one_sequence_per_row(run, ray_local, tiny_reasoner_dir,
                                                             tiny_train_batch) -> None:
    """`learner.share_prompts: false` (each sequence with its own copy of the prompt, packed in rows): the
    same loss, gradient norm and updated weights as the module's shared-prompt step (2 ranks, ZeRO-3), which
    ran fewer positions for the same tokens."""
    from actors.learner import LearnerGroup

    group = LearnerGroup(str(tiny_reasoner_dir), LEARNER.model_copy(update={"share_prompts": False}), ALGO, seed=0,
                         max_new_tokens=64)
    try:
        rows = group.train_step(tiny_train_batch).values
        after = group.gathered_state_dict(include_frozen=True)
    finally:
        group.shutdown()
    shared = run["first"].values
    assert rows["tokens"] == shared["tokens"] and rows["positions"] >= rows["tokens"] > shared["positions"]
    assert rows["loss"] == pytest.approx(shared["loss"], rel=1e-5, abs=1e-7)
    assert rows["grad_norm"] == pytest.approx(shared["grad_norm"], rel=1e-4)
    assert rows["learner_rollout_logp_diff"] < 1e-4
    for name in after:
        np.testing.assert_allclose(after[name], run["after_one"][name], rtol=0, atol=0.1 * LEARNER.lr, err_msg=name)
