"""Names that reach MLflow: any unicode becomes a name MLflow's own validation accepts, stably, distinctly."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name

from pipeline.tracking import MAX_NAME_LENGTH, Tracker, mlflow_safe_keys, mlflow_safe_name

HARD = ["eval/category/Food & Beverage", "100%", "a/b", "Tiere 🐱/Katzen", "", ".", "..", "/lead", "trail/",
        "a//b", "a/./b", "../up", "x" * 400, "Café", "名前"]


def _accepted(name: str) -> None:
    _validate_metric_name(name)
    _validate_param_name(name)
    _validate_tag_name(name)
    assert len(name) <= MAX_NAME_LENGTH


@pytest.mark.parametrize("name", HARD)
def test_hard_names_become_valid(name: str) -> None:
    _accepted(mlflow_safe_name(name))


def test_valid_names_are_kept_and_changed_ones_are_readable() -> None:
    assert mlflow_safe_name("eval/accuracy") == "eval/accuracy"
    assert mlflow_safe_name("data/skipped_tie") == "data/skipped_tie"
    safe = mlflow_safe_name("eval/category/Food & Beverage")
    assert safe.startswith("eval/category/Food _ Beverage-") and len(safe) == len("eval/category/Food _ Beverage-") + 8


def test_names_differing_only_in_replaced_characters_stay_distinct() -> None:
    names = ["a&b", "a%b", "a/b", "a_b", "a😀b", "a🐱b"]
    assert len({mlflow_safe_name(n) for n in names}) == len(names)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_any_unicode_name_is_accepted_by_mlflow_and_stable(name: str) -> None:
    safe = mlflow_safe_name(name)
    _accepted(safe)
    assert mlflow_safe_name(name) == safe  # stable: a function of the name alone
    assert mlflow_safe_name(safe) == safe  # already safe: unchanged


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), unique=True, max_size=12))
def test_distinct_names_in_one_report_never_collide(names: list[str]) -> None:
    safe = mlflow_safe_keys({name: i for i, name in enumerate(names)})
    assert len(safe) == len(names)
    assert sorted(safe.values()) == list(range(len(names)))  # every value kept, none overwritten
    for key in safe:
        _accepted(key)


def test_collision_of_a_valid_name_with_a_hashed_one_gets_a_suffix() -> None:
    hashed = mlflow_safe_name("a&b")
    safe = mlflow_safe_keys({"a&b": 1, hashed: 2})
    assert safe == {hashed: 1, f"{hashed}-2": 2}


def test_a_real_sqlite_run_takes_every_hard_name(tmp_path) -> None:
    """Metrics, params, tags and a table named with &, %, / and emoji reach a real sqlite-backed run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = {"eval/category/Food & Beverage": 0.5, "rate 100%": 0.25, "Tiere 🐱/Katzen": 1.0, "a//b/": 2.0}
    tracker = Tracker(tmp_path / "run", uri, experiment="names", run_name="names",
                      params={"data.source": "x", "weird & param %": "1"}, tags={"tag/😀": "y"})
    tracker.log_metrics(0, names)
    tracker.log_table("samples/step 0 & 😀.json", {"a": [1, 2]})
    assert tracker.close()
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.metrics == {mlflow_safe_name(k): v for k, v in names.items()}
    assert run.data.params[mlflow_safe_name("weird & param %")] == "1"
    assert run.data.tags[mlflow_safe_name("tag/😀")] == "y"
    local = json.loads(tracker.metrics_file.read_text().splitlines()[0])  # the local record keeps originals
    assert {k: local[k] for k in names} == names
