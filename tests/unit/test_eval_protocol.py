"""The ImageReward evaluation protocol (pipeline/eval/protocol.py, the pure parts of pipeline/eval/command.py).

Every expected value is worked out by hand in the comments: which pairs a prompt's ranks make, how a
vote resolves, what accuracy the rows give when ties and unparsable answers count as wrong.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.groups import RankedGroup
from pipeline.eval.stats import answer_prefix, order_stats, prompt_weighted_accuracy, vote_weighted_accuracy
from pipeline.eval.command import group_votes, report_metrics, weighted_accuracies
from pipeline.eval.judging import (anchor_comparisons, anchor_rows, comparison_stats, pairwise_comparisons,
                                   pairwise_rows, with_swapped_orders)
from pipeline.eval.protocol import (PairRow, anchor_scores, imagereward_pairs, majority_vote, row_from_answers,
                              rows_from_scores, summarize)
from pipeline.prompts import format_target
from pipeline.types import Completion, ListenerScore, RolloutGroup


def test_imagereward_pairs_skip_equal_ranks_and_prefer_the_lower_rank():
    # ranks 2, 1, 2, 3: (0,1) rank 1 wins -> image 2; (0,2) tie -> no pair; (0,3) 2 < 3 -> image 1;
    # (1,2) -> 1; (1,3) -> 1; (2,3) -> 1
    assert imagereward_pairs([2, 1, 2, 3]) == [(0, 1, 2), (0, 3, 1), (1, 2, 1), (1, 3, 1), (2, 3, 1)]
    assert imagereward_pairs([1, 1, 1]) == []
    assert len(imagereward_pairs([1, 2, 3, 4, 5, 6])) == 15  # all distinct: n(n-1)/2


@pytest.mark.parametrize(("answers", "predicted", "votes"), [
    ([1, 1, 2], 1, (2, 1, 0)),
    ([2, None, 2, 1], 2, (1, 2, 1)),
    ([1, 2], None, (1, 1, 0)),  # a tie between the images predicts nothing
    ([None, None], None, (0, 0, 2)),  # nothing parsed
    ([1, None, None], 1, (1, 0, 2)),  # unparsable answers do not vote
])
def test_majority_vote(answers, predicted, votes):
    vote = majority_vote(answers)
    assert vote.predicted == predicted
    assert (vote.votes_1, vote.votes_2, vote.unparsable) == votes


def test_accuracy_counts_ties_and_unparsable_as_wrong():
    rows = [
        row_from_answers("a:0-1", "a", 1, [1, 1, 2], "animals"),  # predicted 1, right; p = 2/3
        row_from_answers("a:0-2", "a", 1, [1, 2, None], "animals"),  # 1-1 tie: wrong; p = 1/3
        row_from_answers("a:1-2", "a", 2, [None, None, None], "animals"),  # unparsable: wrong; p = 0
        row_from_answers("b:0-1", "b", 2, [2, 2, 2], "cars"),  # right; p = 1
        row_from_answers("b:0-2", "b", 1, [2, 2, 1], "cars"),  # wrong; p = 1/3
    ]
    assert [r.correct for r in rows] == [True, False, False, True, False]
    assert [r.p_preferred for r in rows] == pytest.approx([2 / 3, 1 / 3, 0.0, 1.0, 1 / 3])
    summary = summarize(rows)
    assert summary["accuracy"] == pytest.approx(2 / 5)
    assert summary["tie_or_unparsable_rate"] == pytest.approx(2 / 5)
    assert summary["unparsable_rate"] == pytest.approx(4 / 15)  # 1 + 3 of 15 answers
    assert summary["prompts"] == 2 and summary["pairs"] == 5
    assert summary["per_category"] == {"animals": {"pairs": 3, "accuracy": pytest.approx(1 / 3)},
                                       "cars": {"pairs": 2, "accuracy": pytest.approx(1 / 2)}}
    assert summary["contradiction_rate"] is None  # no listener


def test_anchor_scores_rank_every_pair_and_equal_scores_tie():
    # Ranks 1, 3, 2; anchor 0. p(image 1 over anchor) = 0.2, p(image 2 over anchor) = 0.4.
    scores = anchor_scores([None, 0.2, 0.4], anchor=0)  # the anchor's own entry is ignored
    assert scores == [0.5, 0.2, 0.4]
    rows = rows_from_scores("p", [1, 3, 2], scores, ["p:0-1", "p:0-2", "p:1-2"])
    # (0,1) gold 1: 0.5 > 0.2 right, p = 0.5/0.7; (0,2) gold 1: 0.5 > 0.4 right, p = 0.5/0.9;
    # (1,2) gold 2 (rank 2 beats rank 3): 0.4 > 0.2 right, p = 0.4/0.6
    assert [(r.gold, r.predicted, r.correct) for r in rows] == [(1, 1, True), (1, 1, True), (2, 2, True)]
    assert [r.p_preferred for r in rows] == pytest.approx([5 / 7, 5 / 9, 2 / 3])
    tied = rows_from_scores("p", [1, 3, 2], anchor_scores([None, 0.5, 0.5], 0), ["x", "y", "z"])
    # scores 0.5, 0.5, 0.5: every pair ties, every pair is wrong
    assert [r.predicted for r in tied] == [None, None, None] and summarize(tied)["accuracy"] == 0.0
    # A failed comparison (image 1's p is None): image 1 has no score; its pairs are wrong with no prediction
    # (the pairwise rule for a pair with no parsed answer); (0, 2) is still judged, 0.5 > 0.4.
    failed = rows_from_scores("p", [1, 3, 2], anchor_scores([None, None, 0.4], 0), ["x", "y", "z"])
    assert [(r.predicted, r.correct, r.failed) for r in failed] == [
        (None, False, "unparsable"), (1, True, ""), (None, False, "unparsable")]
    assert failed[0].p_preferred == 0.0 == row_from_answers("q", "q", 1, [None, None]).p_preferred
    assert row_from_answers("q", "q", 1, [None, None]).failed == "unparsable"


# ---------------------------------------------------------------- judging rollouts


def _group(ranks, group_id="g") -> RankedGroup:
    images = tuple(Image.new("RGB", (8, 8), (30 * k, 0, 0)) for k in range(len(ranks)))
    return RankedGroup(group_id=group_id, prompt_id=group_id, prompt="a prompt", category="cat", images=images,
                       ranks=tuple(ranks))


def _rollout(pair, texts) -> RolloutGroup:
    completions = tuple(
        Completion(pair_id=pair.pair_id, completion_index=k, policy_version=0, token_ids=np.zeros(1, np.int64),
                   logprobs=np.zeros(1, np.float32), text=text, finish_reason="stop")
        for k, text in enumerate(texts))
    return RolloutGroup(pair=pair, prompt_token_ids=np.zeros(1, np.int64), completions=completions,
                        policy_version=0)


def test_pairwise_rows_vote_and_count_listener_contradictions():
    group = _group([1, 2])  # one pair, gold: the image that was index 0
    (comparison,) = pairwise_comparisons([group], seed=0)
    gold = comparison.pair.preferred
    texts = [format_target("r", gold), format_target("r", gold), "no answer here"]
    rollouts = {comparison.pair.pair_id: _rollout(comparison.pair, texts)}
    # Listener: completion 0 agrees (p_preferred 0.9); completion 1 prefers the other image (0.2) -> a
    # contradiction of an answer naming the gold image; completion 2 did not parse -> not judged.
    scores = {(comparison.pair.pair_id, k): ListenerScore(comparison.pair.pair_id, k, p_image_1=0.0,
                                                          p_preferred=p)
              for k, p in enumerate([0.9, 0.2, 0.7])}
    (row,) = pairwise_rows([comparison], rollouts, scores)
    assert (row.gold, row.predicted, row.correct) == (gold, gold, True)
    assert row.p_preferred == pytest.approx(2 / 3) and row.unparsable == 1 and row.samples == 3
    assert (row.contradictions, row.listened) == (1, 2)
    stats = comparison_stats([comparison], rollouts, scores)
    assert stats == {"comparisons": 1, "completions": 3, "unparsable_rate": pytest.approx(1 / 3),
                     "contradiction_rate": 0.5, "skipped_comparisons": {"prompt_too_long": 0}}


def _anchor_p_image_1(comparisons, p_over_anchor):
    """p(image shown first) of each anchor comparison, from p(image k over the anchor) per image k."""
    out = {}
    for c in comparisons:
        k = c.first if c.first != 0 else c.second
        out[c.pair.pair_id] = p_over_anchor[k] if c.first == k else 1.0 - p_over_anchor[k]
    return out


def test_anchor_rows_score_images_by_the_answer_probability():
    group = _group([2, 1, 3])  # anchor is image 0 (rank 2); image 1 is best, image 2 worst
    comparisons = anchor_comparisons([group], seed=0)
    assert len(comparisons) == 2  # n - 1 comparisons
    # p(image 1 over the anchor) 0.75, p(image 2 over the anchor) 0.1, whatever order each was shown in
    rows = anchor_rows([group], comparisons, _anchor_p_image_1(comparisons, {1: 0.75, 2: 0.1}))
    # scores: anchor 0.5, image 1 0.75, image 2 0.1; pairs (0,1) gold 2: 0.75 > 0.5 right;
    # (0,2) gold 1: 0.5 > 0.1 right; (1,2) gold 1: 0.75 > 0.1 right.
    assert [(r.pair_id, r.gold, r.predicted) for r in rows] == [("g:0-1", 2, 2), ("g:0-2", 1, 1), ("g:1-2", 1, 1)]
    assert [r.p_preferred for r in rows] == pytest.approx([0.75 / 1.25, 0.5 / 0.6, 0.75 / 0.85])


def test_oracle_reasoner_ranks_nine_images_perfectly():
    """The issue's case: 9 images (36 pairs). Votes of one greedy answer tie most images (0.667); the
    oracle's answer probability, p(k over anchor) = sigmoid(rank_anchor - rank_k), ranks all 36 right."""
    import math

    ranks = [5, 3, 9, 1, 7, 2, 8, 4, 6]
    group = _group(ranks)
    comparisons = anchor_comparisons([group], seed=3)
    truth = {k: 1 / (1 + math.exp(-(ranks[0] - ranks[k]))) for k in range(1, 9)}
    rows = anchor_rows([group], comparisons, _anchor_p_image_1(comparisons, truth))
    assert len(rows) == 36 and summarize(rows)["accuracy"] == 1.0
    # The same reasoner seen through one greedy vote: p is 0 or 1, so all images better than the anchor tie.
    votes = {k: float(p > 0.5) for k, p in truth.items()}
    voted = anchor_rows([group], comparisons, _anchor_p_image_1(comparisons, votes))
    assert summarize(voted)["accuracy"] == pytest.approx(24 / 36)  # the 0.667 of the issue
    assert sum(r.predicted is None for r in voted) == 12  # C(4,2) + C(4,2) tied pairs


def test_anchor_ties_only_on_equal_probabilities_and_both_orders_average():
    group = _group([2, 1, 3])
    comparisons = with_swapped_orders(anchor_comparisons([group], seed=0))
    assert len(comparisons) == 4
    p = _anchor_p_image_1(comparisons, {1: 0.5, 2: 0.5000001})  # image 1 ties the anchor, image 2 does not
    # the swapped order of image 2's comparison says 0.3 instead: mean (0.5000001 + 0.3) / 2 < 0.5
    swapped_2 = next(c for c in comparisons if c.pair.pair_id.endswith("|swapped") and 2 in (c.first, c.second))
    p[swapped_2.pair.pair_id] = 0.3 if swapped_2.first == 2 else 0.7
    rows = anchor_rows([group], comparisons, p)
    assert [(r.pair_id, r.predicted) for r in rows] == [("g:0-1", None), ("g:0-2", 1), ("g:1-2", 1)]


def test_both_orders_report_each_order_and_the_position_bias():
    groups = [_group([1, 2], "a"), _group([2, 1], "b")]
    comparisons = with_swapped_orders(pairwise_comparisons(groups, seed=0))
    assert [c.pair.pair_id for c in comparisons] == ["a:0-1", "a:0-1|swapped", "b:0-1", "b:0-1|swapped"]
    assert [c.pair.preferred for c in comparisons[:2]] == [comparisons[0].pair.preferred,
                                                           3 - comparisons[0].pair.preferred]
    # a: right in both orders (names the gold image each time: positions differ);
    # b: always answers "1" (position bias): right in one order only.
    answers = {"a:0-1": comparisons[0].pair.preferred, "a:0-1|swapped": comparisons[1].pair.preferred,
               "b:0-1": 1, "b:0-1|swapped": 1}
    rollouts = {c.pair.pair_id: _rollout(c.pair, [format_target("r", answers[c.pair.pair_id])]) for c in comparisons}
    rows = pairwise_rows(comparisons, rollouts, None)
    stats = order_stats(rows)
    assert stats == {"both_orders_pairs": 2, "accuracy_order_shown": pytest.approx(stats["accuracy_order_shown"]),
                     "accuracy_order_swapped": pytest.approx(stats["accuracy_order_swapped"]),
                     "accuracy_mean_of_orders": 0.75, "position_bias_rate": 0.5}
    assert stats["accuracy_order_shown"] + stats["accuracy_order_swapped"] == 1.5  # 2 + 1 right of 4
    assert summarize(rows)["accuracy"] == 0.75  # the mean of the two orders


def test_pair_prompt_and_vote_weighted_accuracy():
    # prompt a: 3 pairs, 3 right; prompt b: 1 pair, wrong. Pair-weighted 3/4, prompt-weighted (1 + 0) / 2.
    rows = [PairRow(f"a:{k}", "a", 1, 1, 1.0, True) for k in range(3)] + [PairRow("b:0-1", "b", 1, 2, 0.0, False)]
    assert summarize(rows)["accuracy"] == 0.75
    assert prompt_weighted_accuracy(rows) == 0.5
    # votes (gold, other): a:0 (7, 3) right -> 7; b:0-1 (6, 4) wrong -> 4; (7 + 4) / 20
    assert vote_weighted_accuracy(rows, {"a:0": (7, 3), "b:0-1": (6, 4)}) == pytest.approx(11 / 20)
    tie = [PairRow("b:0-1|swapped", "b", 2, None, 0.0, False)]  # a tie agrees with no vote
    assert vote_weighted_accuracy(tie, {"b:0-1": (6, 4)}) == 0.0
    group = RankedGroup(group_id="r", prompt_id="r", prompt="p", category="", images=(None, None), ranks=(2, 1),
                        votes=(3.0, 9.0))
    summary = weighted_accuracies([PairRow("r:0-1", "r", 2, 2, 1.0, True)], group_votes([group]))
    assert summary == {"accuracy_pair_weighted": 1.0, "accuracy_prompt_weighted": 1.0,
                       "accuracy_vote_weighted": 0.75}


@pytest.mark.parametrize(("text", "prefix"), [
    ("<think>so</think><answer>2</answer>", "<think>so</think><answer>"),
    ("<think>a</think> <answer> Image 1</answer>", "<think>a</think> <answer> Image "),
    ("<think>a</think>", None), ("<answer>1</answer>", None),
])
def test_answer_prefix_stops_before_the_digit(text, prefix):
    assert answer_prefix(text) == prefix


def test_report_metrics_are_flat_and_recountable():
    rows = [PairRow("a:0-1", "a", 1, 1, 1.0, True, "x"), PairRow("a:0-2", "a", 2, None, 0.0, False, "x")]
    summary = summarize(rows)
    summary.update(skipped_rows={"tie": 3}, options={"model": "m"})
    metrics = report_metrics({"summary": summary, "pairs": [r.to_dict() for r in rows]})
    assert metrics["eval/accuracy"] == 0.5 and metrics["eval/category/x"] == 0.5
    assert metrics["data/skipped_tie"] == 3.0 and metrics["data/skipped_empty_prompt"] == 0.0
    assert "eval/contradiction_rate" not in metrics  # None without a listener


# ---------------------------------------------------------------- settings, names, refusals


def test_settings_come_from_the_cli_then_the_checkpoints_run_then_defaults(tmp_path):
    from pipeline.config import config_to_yaml, load_config
    from pipeline.eval.presets import EVAL_DEFAULTS, RUN_CONFIG_FILE, resolve_settings

    run = load_config(None, ["model.max_pixels=401408", "rollout.max_new_tokens=512", "rollout.engine.dtype=bfloat16",
                             "rollout.engine.max_model_len=8192"])
    (tmp_path / RUN_CONFIG_FILE).write_text(config_to_yaml(run))
    settings = resolve_settings(tmp_path, {"min_pixels": None, "max_pixels": None, "max_new_tokens": 64,
                                           "dtype": None, "max_model_len": None})
    assert (settings.min_pixels, settings.max_pixels, settings.max_new_tokens, settings.dtype,
            settings.max_model_len) == (3136, 401408, 64, "bfloat16", 8192)
    assert settings.sources == {"min_pixels": "checkpoint", "max_pixels": "checkpoint", "max_new_tokens": "cli",
                                "dtype": "checkpoint", "max_model_len": "checkpoint"}
    bare = resolve_settings(tmp_path / "not-ours", {})  # a hub model or a plain HF dir: the defaults
    assert (bare.max_pixels, bare.max_new_tokens) == (EVAL_DEFAULTS["max_pixels"], EVAL_DEFAULTS["max_new_tokens"])
    assert set(bare.sources.values()) == {"default"}


def test_evaluate_logs_any_category_name_to_a_real_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.eval.command import log_to_mlflow
    from pipeline.tracking import mlflow_safe_name

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    names = ["Food & Beverage", "100% real", "Tiere/Katzen", "Pizza 🍕", "Pizza 🍔"]
    rows = [PairRow(f"{k}:0-1", str(k), 1, 1, 1.0, k % 2 == 0, name) for k, name in enumerate(names)]
    summary = summarize(rows)
    summary.update(skipped_rows={}, options={"model": "m", "dataset": "d & 😀"})
    report = {"summary": summary, "pairs": [r.to_dict() for r in rows]}
    path = tmp_path / "report.json"
    path.write_text("{}")
    run = MlflowClient(uri).get_run(log_to_mlflow(report, path, "names"))
    for k, name in enumerate(names):  # distinct, valid, and the report keeps the original name
        assert run.data.metrics[mlflow_safe_name(f"eval/category/{name}")] == (1.0 if k % 2 == 0 else 0.0)
        assert name in summary["per_category"]
    assert run.data.params["dataset"] == "d & 😀"


def _fake_model(root) -> str:
    """A directory that passes the checkpoint check (config.json); the refusals come before any engine."""
    root.mkdir()
    (root / "config.json").write_text("{}")
    return str(root)


def test_a_dataset_with_no_usable_row_is_refused_by_train_and_evaluate(tmp_path, capsys):
    from pipeline.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"p{k}", "image_1": f"gone{k}.png", "image_2": "gone.png",
                                       "label": 1}) + "\n" for k in range(2)))
    model = _fake_model(tmp_path / "model")
    assert main(["evaluate", "--model", model, "--dataset", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert str(bad) in err and "no usable row" in err and "undecodable_image 2" in err
    rc = main(["train", f"data.source={bad}", f"model.reasoner={model}", f"model.listener={model}",
               f"trainer.output_dir={tmp_path / 'run'}"])
    (err,) = _error_lines(capsys.readouterr().err)
    assert rc == 2 and "no usable row" in err and str(bad) in err


def _error_lines(stderr: str) -> list[str]:
    """The error lines of a refusal (datasets' progress bars also write to stderr); never a traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]
