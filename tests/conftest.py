"""Shared fixtures: the tiny offline checkpoints, built once per test run, and an offline environment."""

from __future__ import annotations

import os

# No hub or network at test time; CPU-only engines with the measured-good settings (DESIGN.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_reasoner_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL reasoner checkpoint (seed 0), built once per test run."""
    from pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "reasoner", role="reasoner")


@pytest.fixture(scope="session")
def tiny_listener_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL listener checkpoint (seed 1), built once per test run."""
    from pipeline.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "listener", role="listener")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the test run (logical CPUs and the pool's custom resource)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, resources={"rollout": 8, "listener": 8, "learner": 8}, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
