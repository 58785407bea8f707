"""`python -m pipeline evaluate` end to end on an ImageRewardDB-schema fixture with the tiny reasoner.

Real components throughout: the fixture is parquet in the hub's layout and schema (`data/test-*.parquet`,
`datasets` Image structs, int8 ranks), read by `datasets.load_dataset`; the reasoner runs in the rollout
worker's vLLM CPU engine (one engine start); the report is logged to a real MLflow sqlite store. The test
recounts the reported accuracy from the per-pair rows with the protocol. A category named with `&` and an
emoji reaches MLflow under its safe name. The answer-position probability of `--anchor` is checked
against transformers, and the settings `evaluate` uses are read from a checkpoint made by a real
1-step `python -m pipeline train`.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from pipeline.cli import main
from pipeline.eval.protocol import imagereward_pairs
from pipeline.tracking import mlflow_safe_name

REPO = Path(__file__).resolve().parents[2]
CATEGORY = "Food & Beverage 🍕"  # not a valid MLflow name as it is

pytestmark = pytest.mark.integration

# Prompt "p0": 3 images, ranks 1, 2, 3 -> 3 pairs; "p1": ranks 2, 1, 2 -> 2 pairs (0 and 2 tie);
# "p2": a planted undecodable image (dropped, counted) beside ranks 1, 2 -> 1 pair. 6 pairs in all.
GROUPS = {"p0": [1, 2, 3], "p1": [2, 1, 2], "p2": [1, 2, None]}


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (28, 28), colour).save(buffer, "PNG")
    return buffer.getvalue()


def write_imagereward(root: Path) -> Path:
    features = Features({"image": Image(), "prompt_id": Value("string"), "prompt": Value("string"),
                         "classification": Value("string"), "image_amount_in_total": Value("int8"),
                         "rank": Value("int8")})
    rows = {name: [] for name in features}
    for g, (prompt_id, ranks) in enumerate(GROUPS.items()):
        for k, rank in enumerate(ranks):
            broken = rank is None
            rows["image"].append({"bytes": b"\x89PNG\r\n truncated" if broken else _png((60 * k, 40 * g, 90)),
                                  "path": f"{prompt_id}-{k}.png"})
            rows["prompt_id"].append(prompt_id)
            rows["prompt"].append(f"a red circle number {g}")
            rows["classification"].append(CATEGORY if g < 2 else "Other")
            rows["image_amount_in_total"].append(len(ranks))
            rows["rank"].append(3 if broken else rank)
    (root / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    return root


def test_evaluate_cli_report_recounts(tmp_path, tiny_reasoner_dir, monkeypatch):
    dataset = write_imagereward(tmp_path / "ImageRewardDB")
    monkeypatch.chdir(tmp_path)  # MLflow puts a sqlite store's artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "report.json"
    rc = main(["evaluate", "--model", str(tiny_reasoner_dir), "--dataset", str(dataset), "--split", "test",
               "--samples", "3", "--max-new-tokens", "24", "--max-model-len", "1024", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows, summary = report["pairs"], report["summary"]

    # Which pairs: every pair of a prompt's decodable images with different ranks, nothing else.
    expected = {"p0": {"p0:0-1", "p0:0-2", "p0:1-2"}, "p1": {"p1:0-1", "p1:1-2"}, "p2": {"p2:0-1"}}
    by_prompt = defaultdict(set)
    for row in rows:
        by_prompt[row["prompt_id"]].add(row["pair_id"])
    assert dict(by_prompt) == expected
    assert len(imagereward_pairs([1, 2, 3])) + len(imagereward_pairs([2, 1, 2])) + 1 == len(rows) == 6
    assert summary["skipped_rows"] == {"undecodable_image": 1}

    # Recount with the protocol: right only when the prediction names the gold image (a tie or an
    # unparsable answer is None, hence wrong).
    for row in rows:
        assert row["gold"] in (1, 2) and row["predicted"] in (1, 2, None)
        assert row["correct"] == (row["predicted"] == row["gold"])
        assert 0.0 <= row["p_preferred"] <= 1.0 and row["samples"] == 3
    recount = sum(row["predicted"] == row["gold"] for row in rows) / len(rows)
    assert summary["accuracy"] == pytest.approx(recount)
    assert summary["unparsable_rate"] == pytest.approx(sum(r["unparsable"] for r in rows) / (3 * len(rows)))
    shapes = [r for r in rows if r["category"] == CATEGORY]
    assert summary["per_category"][CATEGORY]["pairs"] == len(shapes) == 5
    assert summary["per_category"][CATEGORY]["accuracy"] == pytest.approx(
        sum(r["correct"] for r in shapes) / len(shapes))
    by_prompt_correct = defaultdict(list)
    for row in rows:
        by_prompt_correct[row["prompt_id"]].append(row["correct"])
    assert summary["accuracy_pair_weighted"] == summary["accuracy"]
    assert summary["accuracy_prompt_weighted"] == pytest.approx(
        sum(sum(c) / len(c) for c in by_prompt_correct.values()) / 3)
    assert summary["options"]["max_new_tokens"] == 24 and summary["options"]["settings_from"] == {
        "min_pixels": "default", "max_pixels": "default", "max_new_tokens": "cli", "dtype": "default",
        "max_model_len": "cli"}

    # The same numbers reached MLflow, with the report as an artifact.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("listener-grpo-eval").experiment_id])
    assert run.data.metrics["eval/accuracy"] == pytest.approx(summary["accuracy"])
    assert run.data.metrics["data/skipped_undecodable_image"] == 1.0
    assert run.data.metrics[mlflow_safe_name(f"eval/category/{CATEGORY}")] == pytest.approx(
        summary["per_category"][CATEGORY]["accuracy"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.json"]


def test_answer_position_probability_matches_transformers(tiny_reasoner_dir):
    """`RolloutWorker.answer_p_image_1` (the --anchor score) against the same probability from transformers."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from actors.rollout import RolloutWorker
    from pipeline.config import EngineConfig
    from pipeline.prompts import reasoner_prompt
    from pipeline.synthetic import synthetic_pairs

    pairs = list(synthetic_pairs(seed=0, count=2))
    prefixes = ["<think>the red one</think><answer>", "<think>looks right</think><answer>"]
    worker = RolloutWorker(str(tiny_reasoner_dir), EngineConfig(dtype="float32", max_model_len=1024))
    got = worker.answer_p_image_1(pairs, prefixes)
    processor = AutoProcessor.from_pretrained(tiny_reasoner_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_reasoner_dir, dtype=torch.float32).eval()
    one, two = (processor.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("1", "2"))
    for pair, prefix, p in zip(pairs, prefixes, got):
        enc = processor(text=[reasoner_prompt(pair.prompt) + prefix], images=[pair.image_1, pair.image_2],
                        return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0, -1].float()
        expected = 1 / (1 + math.exp(-(logits[one] - logits[two]).item()))
        assert 0.0 < p < 1.0 and p == pytest.approx(expected, abs=2e-3)


def test_settings_come_from_a_checkpoint_of_a_one_step_run(tmp_path, monkeypatch, capsys, tiny_reasoner_dir,
                                                            tiny_listener_dir):
    """A real 1-step `python -m pipeline train`; its checkpoint's policy evaluated with no settings given."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline", "train", f"trainer.output_dir={run_dir}", "trainer.steps=1",
               f"model.reasoner={tiny_reasoner_dir}", f"model.listener={tiny_listener_dir}",
               f"tracking.tracking_uri=sqlite:///{tmp_path / 'train.db'}", "data.eval_pairs=0",
               "model.max_pixels=6272", "rollout.max_new_tokens=20", "rollout.engine.dtype=float32"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1200,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    policy = run_dir / "checkpoints" / "step-00000001" / "policy"
    assert (policy / "run_config.yaml").is_file()

    dataset = write_imagereward(tmp_path / "ImageRewardDB")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "report.json"
    rc = main(["evaluate", "--model", str(policy), "--dataset", str(dataset), "--max-groups", "1", "--anchor",
               "--both-orders", "--max-model-len", "1024", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "max_pixels 6272 (checkpoint)" in printed and "max_new_tokens 20 (checkpoint)" in printed
    options = json.loads(out.read_text())["summary"]["options"]
    assert (options["min_pixels"], options["max_pixels"], options["max_new_tokens"], options["dtype"]) == (
        3136, 6272, 20, "float32")
    # every setting the run recorded comes from it; max_model_len was given on the command line above
    assert options["settings_from"] == {"min_pixels": "checkpoint", "max_pixels": "checkpoint",
                                        "max_new_tokens": "checkpoint", "dtype": "checkpoint", "max_model_len": "cli"}
    report = json.loads(out.read_text())
    assert [r["pair_id"] for r in report["pairs"]] == ["p0:0-1", "p0:0-2", "p0:1-2"]  # anchor: judged by scores
    assert report["summary"]["comparisons"] == 4  # 2 anchor comparisons, each in both orders
