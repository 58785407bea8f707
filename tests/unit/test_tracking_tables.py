"""Sample tables in MLflow's table format, and the run's bounded list of them (hand-worked values)."""

from __future__ import annotations

import io
import json

import pytest

from pipeline.tracking import table_json, table_registry


def test_a_table_is_written_in_pandas_split_orient() -> None:
    text = table_json({"prompt": ["a", "b"], "reward": [1.5, None]})
    assert json.loads(text) == {"columns": ["prompt", "reward"], "data": [["a", 1.5], ["b", None]]}
    import pandas as pd

    frame = pd.read_json(io.StringIO(text), orient="split")  # how mlflow.load_table reads it back
    assert list(frame.columns) == ["prompt", "reward"] and frame["prompt"].tolist() == ["a", "b"]


def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        table_json({"a": [1, 2], "b": [1]})


def _entry(path: str) -> dict[str, str]:
    return {"path": path, "type": "table"}


def test_the_registry_appends_and_moves_a_relogged_table_last() -> None:
    assert table_registry([], "s/1.json") == [_entry("s/1.json")]
    assert table_registry([_entry("s/1.json"), _entry("s/2.json")], "s/1.json") == [_entry("s/2.json"),
                                                                                    _entry("s/1.json")]


def test_the_registry_drops_the_oldest_tables_beyond_the_tag_limit() -> None:
    # json.dumps([{"path": "s/1.json", "type": "table"}]): 37 characters of entry + 2 of brackets; each
    # further entry adds 39 (", " + 37)
    assert len(json.dumps([_entry("s/1.json")])) == 39
    assert len(json.dumps([_entry("s/1.json"), _entry("s/2.json")])) == 78
    entries = [_entry(f"s/{i}.json") for i in range(1, 4)]  # 117 characters; with s/4.json, 156
    assert table_registry(entries, "s/4.json", limit=117) == [_entry("s/2.json"), _entry("s/3.json"),
                                                              _entry("s/4.json")]
    assert table_registry(entries, "s/4.json", limit=156) == [*entries, _entry("s/4.json")]
    assert table_registry(entries, "s/4.json", limit=10) == [_entry("s/4.json")]  # the newest always stays


def test_a_malformed_table_is_refused_when_logged_and_does_not_block_later_sends(tmp_path) -> None:
    """Refused in the caller: queued, it would fail every later flush and hold back the tables after it."""
    from pipeline.tracking import Tracker

    tracker = Tracker(tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="tables",
                      run_name="tables", params={}, tags={})
    with pytest.raises(ValueError, match="differ in length"):
        tracker.log_table("samples/bad.json", {"a": [1, 2], "b": [1]})
    tracker.log_table("samples/good.json", {"a": [1, 2], "b": [3, 4]})
    assert tracker.close() and tracker.flush_failures == 0
    from mlflow.tracking import MlflowClient

    stored = [a.path for a in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(tracker.run_id,
                                                                                                "samples")]
    assert stored == ["samples/good.json"]
