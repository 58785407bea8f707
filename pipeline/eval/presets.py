"""Evaluation presets (the paper's test sets) and the settings `evaluate` takes from the checkpoint's run.

    preset = resolve_dataset("imagereward-test")      # or any hub id / local path: passed through
    settings = resolve_settings(model_dir, cli={"max_pixels": None, ...})

Presets name a hub dataset, split, subset, format and weighting (docs/evaluation.md lists them with their
sizes); they resolve through the ordinary loading code (`pipeline.eval.groups.ranked_groups` ->
`pipeline.data.source.load_rows`), so a local copy in the same layout can be passed as `--dataset PATH` instead.

Settings: a training checkpoint's policy directory holds `run_config.yaml` (written by
`actors.checkpoint.save_checkpoint`); `min_pixels`, `max_pixels` (model), `max_new_tokens`, the engine
dtype and `max_model_len` (rollout) come from it unless given on the command line, else from `EVAL_DEFAULTS`. Each setting
records where it came from ("cli", "checkpoint" or "default").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

RUN_CONFIG_FILE = "run_config.yaml"  # in a checkpoint's policy/ directory
Weighting = Literal["pairs", "votes"]


@dataclass(frozen=True)
class DatasetPreset:
    source: str  # hub id
    split: str
    format: str
    subset: str = ""
    weighting: Weighting = "pairs"  # "votes": also report accuracy weighted by human votes


PRESETS: dict[str, DatasetPreset] = {
    # ImageReward's test set: 466 prompts (the same in every subset; "1k" is the smallest download).
    "imagereward-test": DatasetPreset("THUDM/ImageRewardDB", "test", "imagereward"),
    # HPS v2's ranking test: test.json, one row per prompt with ranked images.
    "hpdv2-test": DatasetPreset("ymhao/HPDv2", "test", "hpdv2"),
    # The paper's out-of-distribution set: pairs with human vote counts.
    "rapidata-style": DatasetPreset("Rapidata/human-style-preferences-images", "train", "rapidata",
                                    weighting="votes"),
}


def resolve_dataset(name: str) -> DatasetPreset | None:
    """The preset called `name`, or None for a hub id or local path."""
    return PRESETS.get(name)


EVAL_DEFAULTS = {"min_pixels": 3136, "max_pixels": 12544, "max_new_tokens": 256, "dtype": "float32",
                 "max_model_len": 4096}


@dataclass(frozen=True)
class EvalSettings:
    min_pixels: int
    max_pixels: int
    max_new_tokens: int
    dtype: str
    max_model_len: int
    sources: dict[str, str]  # setting -> "cli" | "checkpoint" | "default"

    def describe(self) -> str:
        return ", ".join(f"{k} {getattr(self, k)} ({self.sources[k]})" for k in EVAL_DEFAULTS)


def checkpoint_settings(model_dir: str | Path) -> dict:
    """The training settings recorded with a checkpoint (empty when the model is not one of ours)."""
    path = Path(model_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return {}
    run = yaml.safe_load(path.read_text()) or {}
    model, rollout = run.get("model", {}), run.get("rollout", {})
    engine = rollout.get("engine", {})
    found = {"min_pixels": model.get("min_pixels"), "max_pixels": model.get("max_pixels"),
             "max_new_tokens": rollout.get("max_new_tokens"), "dtype": engine.get("dtype"),
             "max_model_len": engine.get("max_model_len")}
    return {k: v for k, v in found.items() if v is not None}


def resolve_settings(model_dir: str | Path, cli: dict) -> EvalSettings:
    """Each setting from the command line (not None), else the checkpoint's run, else `EVAL_DEFAULTS`."""
    recorded = checkpoint_settings(model_dir)
    values, sources = {}, {}
    for key, default in EVAL_DEFAULTS.items():
        if cli.get(key) is not None:
            values[key], sources[key] = cli[key], "cli"
        elif key in recorded:
            values[key], sources[key] = recorded[key], "checkpoint"
        else:
            values[key], sources[key] = default, "default"
    return EvalSettings(**values, sources=sources)
