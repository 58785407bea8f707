"""The order `make test` starts the e2e/integration files in (tests/conftest.py): every file named exists,
and the files said not to need the warm starts do not ask for them (they run while another worker builds
them; one that asked would wait for the build instead)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tests_root_conftest", TESTS / "conftest.py")
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
LEARNING_FIRST, WITHOUT_WARM_STARTS, WITH_WARM_STARTS = (_conftest.LEARNING_FIRST, _conftest.WITHOUT_WARM_STARTS,
                                                         _conftest.WITH_WARM_STARTS)
SLOW_FIRST = _conftest.SLOW_FIRST
WARM_START_FIXTURES = ("tiny_sft_dirs", "tiny_reasoner_sft_dir", "tiny_listener_sft_dir")


def _uses_warm_starts(relative: str) -> bool:
    text = (TESTS / relative).read_text()
    return any(name in text for name in WARM_START_FIXTURES)


def test_every_ordered_file_exists_once() -> None:
    assert len(set(SLOW_FIRST)) == len(SLOW_FIRST)
    assert [name for name in SLOW_FIRST if not (TESTS / name).is_file()] == []


def test_files_said_to_run_without_the_warm_starts_do_not_ask_for_them() -> None:
    assert [name for name in WITHOUT_WARM_STARTS if _uses_warm_starts(name)] == []
    assert all(_uses_warm_starts(name) for name in LEARNING_FIRST + WITH_WARM_STARTS)
