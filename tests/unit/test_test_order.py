"""The order `make test` starts the e2e/integration files in (tests/conftest.py `SLOW_FIRST`): every file it
names exists, once (a renamed file would silently fall back to collection order)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _slow_first() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("tests_root_conftest", TESTS / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.SLOW_FIRST


def test_every_ordered_file_exists_once() -> None:
    order = _slow_first()
    assert len(set(order)) == len(order)
    assert [name for name in order if not (TESTS / name).is_file()] == []
    assert all(name.startswith(("e2e/", "integration/", "gpu/")) for name in order)
