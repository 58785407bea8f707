"""`python -m pipeline evaluate` and a 2-step `python -m pipeline train` on local copies of the real hub trees
(tests/hub_layouts.py: ImageRewardDB's metadata table + zips of WebP, HPDv2's json + tar.gz).

Real components throughout: `datasets`, zipfile, tarfile, the tiny reasoner in the rollout worker's vLLM
CPU engine, MLflow on sqlite, the training job on local Ray. Each evaluation checks that exactly the
protocol's pairs were judged (recomputed here from the files, not from the code under test), that the
corrupt image is counted and listed in the summary, and that the accuracy recounts from the per-pair rows;
in anchor mode the rows are recounted from the per-comparison probabilities the report keeps.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the hub-layout builder
from hub_layouts import (corrupt_members, hpdv2_test_items, hpdv2_train_items, write_hpdv2,  # noqa: E402
                         write_imagereward_db)

from pipeline.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
# "a": ranks 1 2 3; "b": a tie; "c": an undecodable image beside ranks 2, 1; "long": a prompt too long for
# --max-model-len 512 (skipped, counted, judged wrong).
TEST = {"a": [1, 2, 3], "b": [1, 2, 1, 3], "c": [2, None, 1], "long": [1, 2]}
LONG_PROMPT = " ".join(["an oversized prompt about a red square"] * 120)


def protocol_pair_ids(root: Path, split: str) -> set[str]:
    """`prompt:i-j` for every two decodable images of a prompt with different ranks, i and j the images'
    positions among the prompt's rows in the metadata table (read here with pyarrow)."""
    table = pq.read_table(root / f"metadata-{split}.parquet").to_pylist()
    broken = corrupt_members(root)
    members = defaultdict(list)
    for row in table:
        members[row["prompt_id"]].append(row)
    out = set()
    for prompt_id, rows in members.items():
        for i, j in itertools.combinations(range(len(rows)), 2):
            a, b = rows[i], rows[j]
            if a["rank"] != b["rank"] and a["image_path"] not in broken and b["image_path"] not in broken:
                out.add(f"{prompt_id}:{i}-{j}")
    return out


def _evaluate(tmp_path, monkeypatch, model, dataset, *extra) -> dict:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "report.json"
    rc = main(["evaluate", "--model", str(model), "--dataset", str(dataset), "--split", "test",
               "--max-new-tokens", "16", "--out", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_evaluate_an_imagereward_db_copy(tmp_path, monkeypatch, tiny_reasoner_dir):
    root = write_imagereward_db(tmp_path / "ImageRewardDB", {"test": TEST}, prompts={"long": LONG_PROMPT})
    report = _evaluate(tmp_path, monkeypatch, tiny_reasoner_dir, root, "--max-model-len", "512",
                       "--chunk-pairs", "3")
    rows, summary = report["pairs"], report["summary"]
    assert {row["pair_id"] for row in rows} == protocol_pair_ids(root, "test") and len(rows) == 3 + 5 + 1 + 1
    assert summary["skipped_rows"] == {"undecodable_image": 1}
    (skip,) = summary["skipped"]
    assert skip["reason"] == "undecodable_image" and skip["item"].startswith("c image ")
    assert next(iter(corrupt_members(root))) in skip["item"]
    # The over-long prompt: skipped by the engine, counted, and its pair judged wrong (a failed answer).
    (long_row,) = [row for row in rows if row["prompt_id"] == "long"]
    assert long_row["failed"] == "prompt_too_long" and long_row["correct"] is False
    assert summary["skipped_comparisons"] == {"prompt_too_long": 1}
    assert summary["options"]["max_model_len"] == 512
    for row in rows:
        assert row["correct"] == (row["predicted"] == row["gold"])
    assert summary["accuracy"] == pytest.approx(sum(r["predicted"] == r["gold"] for r in rows) / len(rows))
    answers = {c["pair_id"]: c["answers"] for c in report["comparisons"]}
    assert set(answers) == {row["pair_id"] for row in rows} and answers[long_row["pair_id"]] == []


def _anchor_recount(report: dict) -> dict[str, tuple[int | None, bool]]:
    """Each row's prediction recomputed from the report's anchor probabilities: image k's score is the
    mean of p(k over the anchor) over its comparisons (None when none answered), the anchor 0.5; a pair
    with an unscored image, or with equal scores, has no prediction."""
    asked = defaultdict(list)
    for c in report["comparisons"]:
        k = c["second"] if c["first"] == 0 else c["first"]
        p = c["p_image_1"]
        asked[c["prompt_id"], k].append(None if p is None else p if c["first"] == k else 1 - p)
    out = {}
    for row in report["pairs"]:
        i, j = (int(x) for x in row["pair_id"].rsplit(":", 1)[1].split("-"))
        scores = []
        for k in (i, j):
            got = [p for p in asked.get((row["prompt_id"], k), []) if p is not None]
            scores.append(0.5 if k == 0 else (sum(got) / len(got) if got else None))
        s_i, s_j = scores
        predicted = None if None in scores or s_i == s_j else 1 if s_i > s_j else 2
        out[row["pair_id"]] = (predicted, predicted == row["gold"])
    return out


def test_evaluate_an_hpdv2_copy_with_anchor_scores(tmp_path, monkeypatch, tiny_reasoner_dir):
    items = hpdv2_test_items([[1, 2, 3], [2, 1, 2, 3], [1, 3, 2]])
    root = write_hpdv2(tmp_path / "HPDv2", "test", items, corrupt={"000013.jpg"})
    report = _evaluate(tmp_path, monkeypatch, tiny_reasoner_dir, root, "--anchor", "--max-model-len", "1024")
    rows, summary = report["pairs"], report["summary"]
    expected = {"hpdv2-0:0-1", "hpdv2-0:0-2", "hpdv2-0:1-2", "hpdv2-1:0-1", "hpdv2-1:1-2",  # 0-2 tie, 3 corrupt
                "hpdv2-2:0-1", "hpdv2-2:0-2", "hpdv2-2:1-2"}
    assert {row["pair_id"] for row in rows} == expected
    assert summary["skipped_rows"] == {"undecodable_image": 1} and "000013.jpg" in summary["skipped"][0]["item"]
    recount = _anchor_recount(report)
    assert {r["pair_id"]: (r["predicted"], r["correct"]) for r in rows} == recount
    assert summary["accuracy"] == pytest.approx(sum(c for _, c in recount.values()) / len(rows))
    assert all("p_image_1" in c for c in report["comparisons"]) and len(report["comparisons"]) == 2 + 2 + 2


@pytest.mark.parametrize("layout", ["imagereward_db", "hpdv2"])
def test_two_training_steps_on_a_hub_layout_copy(tmp_path, layout, tiny_reasoner_dir, tiny_listener_dir):
    """`data.source: DIR` with DIR a copy of the hub tree; the run must read its pairs from the archives."""
    if layout == "imagereward_db":
        train = {f"p{k}": [1, 2, 3] for k in range(4)}
        dataset = write_imagereward_db(tmp_path / "ImageRewardDB", {"train": train}, per_folder=2)
    else:
        dataset = write_hpdv2(tmp_path / "HPDv2", "train", hpdv2_train_items([[1, 0], [0, 1]] * 4))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline", "train", f"trainer.output_dir={run_dir}", "trainer.steps=2",
               f"model.reasoner={tiny_reasoner_dir}", f"model.listener={tiny_listener_dir}",
               f"tracking.tracking_uri=sqlite:///{tmp_path / 'train.db'}", "data.eval_pairs=0",
               f"data.source={dataset}", "data.split=train", "data.pairs_per_step=2", "model.max_pixels=6272",
               "rollout.max_new_tokens=16", "rollout.engine.dtype=float32"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert (run_dir / "checkpoints" / "step-00000002").is_dir()
    if layout == "hpdv2":
        assert (dataset / "train").is_dir()  # the archive was unpacked once, beside it
