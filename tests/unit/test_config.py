"""Config: every YAML validates, overrides apply, bad keys and types fail with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, config_to_yaml, flatten_config, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
REQUIRED_KEYS = [
    "trainer.steps", "trainer.output_dir", "trainer.seed", "data.pairs_per_step", "rollout.group_size",
    "rollout.num_workers", "listener.num_workers", "learner.num_ranks", "reward.w_format",
    "reward.w_accuracy", "reward.w_listener", "sync.transport", "model.reasoner", "model.listener",
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path: Path) -> None:
    assert isinstance(load_config(path), RunConfig)


def test_required_keys_exist_under_their_names() -> None:
    flat = flatten_config(load_config())
    missing = [key for key in REQUIRED_KEYS if key not in flat]
    assert missing == []


def test_paper_config_is_the_paper_setup() -> None:
    cfg = load_config(REPO / "configs" / "qwen25vl_7b.yaml")
    assert cfg.model.reasoner == cfg.model.listener == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (cfg.reward.w_format, cfg.reward.w_accuracy, cfg.reward.w_listener) == (1.0, 0.5, 0.5)
    assert cfg.rollout.num_gpus >= 1 and cfg.learner.num_gpus >= 1 and cfg.listener.num_gpus >= 1


def test_every_field_is_documented() -> None:
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation, f"{prefix}{name}.")

    walk(RunConfig)


def test_overrides_are_parsed_as_yaml_values() -> None:
    cfg = load_config(None, ["learner.lr=1e-6", "trainer.steps=7", "sync.transport=collective",
                             "algo.dual_clip=3", "model.reasoner=/tmp/ckpt"])
    assert cfg.learner.lr == 1e-6
    assert cfg.trainer.steps == 7
    assert cfg.sync.transport == "collective"
    assert cfg.algo.dual_clip == 3.0
    assert cfg.model.reasoner == "/tmp/ckpt"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["rollout.gruop_size=4"], "unknown key 'rollout.gruop_size'"),
        (["trainer.steps=many"], "key 'trainer.steps'"),
        (["rollout.group_size=-2"], "key 'rollout.group_size'"),
        (["sync.transport=carrier-pigeon"], "key 'sync.transport'"),
        (["nosuchsection.x=1"], "unknown key 'nosuchsection'"),
        (["trainer.steps"], "expected key=value"),
        (["model.min_pixels=100000"], "min_pixels"),
    ],
)
def test_bad_values_fail_with_the_key_named(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert "tiny_cpu.yaml" in message or "expected key=value" in message


def test_misspelt_key_in_a_file_names_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'trainer\.stepz'"):
        load_config(bad)


def test_yaml_round_trip() -> None:
    cfg = load_config(None, ["trainer.steps=5"])
    again = RunConfig.model_validate(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_print_config_prints_resolved_yaml() -> None:
    result = _cli("train", "--print-config", "trainer.steps=2")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["trainer"]["steps"] == 2


def test_cli_bad_config_is_one_line_without_traceback() -> None:
    result = _cli("train", "--print-config", "rollout.gruop_size=4")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "rollout.gruop_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_lists_subcommands() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    for command in ("train", "evaluate", "make-tiny"):
        assert command in result.stdout
        assert _cli(command, "--help").returncode == 0
