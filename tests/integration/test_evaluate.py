"""`python -m pipeline evaluate` end to end on an ImageRewardDB-schema fixture with the tiny reasoner.

Real components throughout: the fixture is parquet in the hub's layout and schema (`data/test-*.parquet`,
`datasets` Image structs, int8 ranks), read by `datasets.load_dataset`; the reasoner runs in the rollout
worker's vLLM CPU engine (one engine start); the report is logged to a real MLflow sqlite store. The test
recounts the reported accuracy from the per-pair rows with the protocol.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from pipeline.cli import main
from pipeline.metrics import imagereward_pairs

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
            rows["classification"].append("Shapes" if g < 2 else "Other")
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
    shapes = [r for r in rows if r["category"] == "Shapes"]
    assert summary["per_category"]["Shapes"]["pairs"] == len(shapes) == 5
    assert summary["per_category"]["Shapes"]["accuracy"] == pytest.approx(
        sum(r["correct"] for r in shapes) / len(shapes))

    # The same numbers reached MLflow, with the report as an artifact.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("listener-grpo-eval").experiment_id])
    assert run.data.metrics["eval/accuracy"] == pytest.approx(summary["accuracy"])
    assert run.data.metrics["data/skipped_undecodable_image"] == 1.0
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.json"]
