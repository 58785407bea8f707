"""Checkpoint resolution: tiny:// builds, local paths must exist, hub ids pass through."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.models import resolve_checkpoint


def test_hub_id_passes_through(tmp_path: Path) -> None:
    assert resolve_checkpoint("Qwen/Qwen2.5-VL-7B-Instruct", "model.reasoner", tmp_path) == \
        "Qwen/Qwen2.5-VL-7B-Instruct"


def test_missing_local_path_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.listener: model path '/nope/ckpt' does not exist"):
        resolve_checkpoint("/nope/ckpt", "model.listener", tmp_path)


def test_existing_checkpoint_dir_resolves_to_its_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(tmp_path / "ckpt"), "model.reasoner", tmp_path) == str(tmp_path / "ckpt")


def test_unknown_tiny_role_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tiny role 'critic'"):
        resolve_checkpoint("tiny://critic", "model.reasoner", tmp_path)


def test_tiny_is_reused_once_built(tmp_path: Path) -> None:
    built = tmp_path / "tiny-reasoner"
    built.mkdir()
    (built / "tiny_manifest.json").write_text("{}")  # an existing build is not rebuilt
    assert resolve_checkpoint("tiny://reasoner", "model.reasoner", tmp_path) == str(built)
