"""docs/reliability.md: every row of its tables names a test that exists, and every fault and bad input the
issue lists has a row. A renamed or deleted test, or a dropped row, fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.data.formats import SKIP_REASONS

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"
TEST_REF = re.compile(r"`(tests/[\w/.-]+\.py)::(\w+)`")
# What the issue asks the document to cover (a case-insensitive phrase of each row's first column).
REQUIRED_ROWS = [
    "rollout worker killed mid-step", "listener killed mid-step", "listener pool resize", "learner rank killed",
    "during a checkpoint write", "ctrl-c", "mlflow server down for part of a run", "never back", "unknown key",
    "wrong type", "negative", "more gpus", "missing model path", "adversarial completions", "secrets",
    "unsafe weights", "remote code", "dashboard", "root",
    *SKIP_REASONS,  # bad data rows, one per skip reason
]


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of every markdown table, as lists of cells (header and separator rows dropped)."""
    rows, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[\s:|-]+\|", line.strip()):
            is_header = not previous.startswith("|")
            if not is_header:
                rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        previous = line
    return rows


def missing_tests(markdown: str, repo: Path) -> list[str]:
    """Rows with no test reference, and references to a file or a test function that does not exist."""
    problems = []
    for row in table_rows(markdown):
        refs = TEST_REF.findall(row[-1])
        if not refs:
            problems.append(f"no test named for: {row[0]}")
        for file, name in refs:
            path = repo / file
            if not path.is_file() or not re.search(rf"^\s*(async\s+)?def {name}\(", path.read_text(), re.MULTILINE):
                problems.append(f"{file}::{name}")
    return problems


def test_every_row_names_tests_that_exist() -> None:
    rows = table_rows(DOC.read_text())
    assert len(rows) >= 20
    assert missing_tests(DOC.read_text(), REPO) == []


@pytest.mark.parametrize("phrase", REQUIRED_ROWS)
def test_each_fault_and_bad_input_of_the_issue_has_a_row(phrase: str) -> None:
    assert any(phrase.lower() in row[0].lower() for row in table_rows(DOC.read_text())), phrase


def test_the_checker_catches_a_missing_test_and_a_row_without_one(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test_real():\n    pass\n")
    doc = ("| Fault | Does | Test |\n|---|---|---|\n"
           "| a | x | `tests/test_x.py::test_real` |\n"
           "| b | y | `tests/test_x.py::test_gone` |\n"
           "| c | z | `tests/test_nofile.py::test_real` |\n"
           "| d | w | none |\n")
    assert missing_tests(doc, tmp_path) == ["tests/test_x.py::test_gone", "tests/test_nofile.py::test_real",
                                            "no test named for: d"]
