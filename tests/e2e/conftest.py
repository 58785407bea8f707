"""E2E fixtures: a real `ray start --head` cluster on 127.0.0.1 with token auth, torn down on its own
(tests/conftest.py `RayHead`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests_e2e_helpers


@pytest.fixture
def ray_head(ray_head_factory):
    """A separate local Ray cluster (head only, tests/conftest.py RayHead) with the job server on 127.0.0.1."""
    return ray_head_factory(num_cpus=8, resources='{"rollout": 8, "listener": 8, "learner": 8}')
