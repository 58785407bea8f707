"""Planted bugs the unit tests must catch (issue 18): each is applied to a copy of the repository and the
relevant unit test files are run there in a subprocess; they must fail. The unmodified copy must pass the
same files, so a failure is the bug's doing, not the copy's.

- `make_score` returning 1 - p(image 1) as p(preferred) for every pair (the label ignored);
- the reward reading the score's p(image 1) instead of its p(preferred).

Run: `.venv/bin/python -m pytest tests/unit/test_mutations.py` (three short pytest runs in a temporary copy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COPIED = ("pipeline", "actors", "tests/unit", "tests/conftest.py", "pyproject.toml")
TEST_FILES = ("tests/unit/test_rewards.py", "tests/unit/test_reward_aggregator.py")
# name -> (file, the correct line, the planted bug)
MUTANTS = {
    "make_score_ignores_the_label": (
        "actors/listener.py",
        "p_preferred = p_image_1 if request.pair.preferred == 1 else 1.0 - p_image_1",
        "p_preferred = 1.0 - p_image_1",
    ),
    "reward_reads_p_image_1": (
        "pipeline/rewards.py",
        "p_preferred = score.p_preferred if score is not None else",
        "p_preferred = score.p_image_1 if score is not None else",
    ),
}


def copy_repo(dest: Path) -> Path:
    for rel in COPIED:
        src, dst = REPO / rel, dest / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return dest


def run_pytest(root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TEST_FILES],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def clean_copy_passes(tmp_path_factory) -> None:
    root = copy_repo(tmp_path_factory.mktemp("clean"))
    where = subprocess.run([sys.executable, "-c", "import actors.listener, pipeline.rewards as r; print(r.__file__)"],
                           cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve() == (root / "pipeline" / "rewards.py").resolve()  # the copy is what runs
    result = run_pytest(root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_planted_bug_fails_the_unit_tests(name: str, clean_copy_passes: None, tmp_path: Path) -> None:
    rel, correct, bug = MUTANTS[name]
    root = copy_repo(tmp_path)
    source = (root / rel).read_text()
    assert source.count(correct) == 1, f"{rel} changed: update the planted bug {name!r} in MUTANTS"
    (root / rel).write_text(source.replace(correct, bug))
    result = run_pytest(root)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # 1: tests failed (not an error)
