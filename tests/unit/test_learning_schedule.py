"""bench/learning.py's scheduling: how many runs go side by side, and that the first failure stops the runs
not yet started. The runs here are stand-ins for `python -m pipeline train` (a subprocess of minutes)."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import pytest

import bench.learning as learning


def test_default_parallel_follows_cores_and_memory() -> None:
    assert learning.RUN_MEMORY_GIB == 7.0
    assert learning.default_parallel(cores=2, cores_per_run=1, available_gib=22.0) == 2
    assert learning.default_parallel(cores=16, cores_per_run=1, available_gib=22.0) == 3  # 22 // 7
    assert learning.default_parallel(cores=16, cores_per_run=2, available_gib=120.0) == 8
    assert learning.default_parallel(cores=1, cores_per_run=2, available_gib=3.0) == 1  # never none


def _args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(workdir=tmp_path, cores_per_run=1)


def test_run_all_runs_side_by_side_and_saves_each_record(tmp_path: Path, monkeypatch) -> None:
    lock, running, peak = threading.Lock(), [0], [0]

    def stand_in_train(arm, seed, overrides, workdir, cores):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return workdir / f"{arm}-seed{seed}"

    monkeypatch.setattr(learning, "train", stand_in_train)
    monkeypatch.setattr(learning, "run_record", lambda run_dir: {"run_dir": run_dir.name})
    todo = [(arm, seed, [f"trainer.seed={seed}"]) for seed in (0, 1) for arm in ("off", "on")]
    done = learning.run_all(todo, _args(tmp_path), {0: 0, 1: 0}, parallel=2)
    assert sorted(done) == ["off/seed0", "off/seed1", "on/seed0", "on/seed1"]
    assert peak[0] == 2
    assert done["on/seed1"]["run_dir"] == "on-seed1" and done["on/seed1"]["cores"] == 1
    assert (tmp_path / "off-seed0.json").is_file() and (tmp_path / "on-seed1.json").is_file()


def test_run_all_stops_at_the_first_failure_keeping_finished_records(tmp_path: Path, monkeypatch) -> None:
    started = []

    def stand_in_train(arm, seed, overrides, workdir, cores):
        started.append((arm, seed))
        if arm == "on":
            raise RuntimeError(f"{arm} seed {seed} failed (exit 1)")
        time.sleep(0.3)
        return workdir / f"{arm}-seed{seed}"

    monkeypatch.setattr(learning, "train", stand_in_train)
    monkeypatch.setattr(learning, "run_record", lambda run_dir: {})
    todo = [(arm, seed, []) for seed in (0, 1, 2) for arm in ("off", "on")]
    with pytest.raises(RuntimeError, match="on seed 0 failed"):
        learning.run_all(todo, _args(tmp_path), {0: 0, 1: 0, 2: 0}, parallel=2)
    assert ("off", 2) not in started  # not started after the failure
    assert (tmp_path / "off-seed0.json").is_file()  # the run beside the failure finished and was saved


def test_machine_paths_in_reports_are_cut_to_the_checkouts_runs() -> None:
    manifest = {"base_model": "/home/me/repo/runs/bench-models/tiny-listener", "settings": {"seed": 1},
                "notes": ["/srv/x/runs/a", "relative/runs/b", "no path"]}
    assert learning._cut_to_runs(manifest) == {"base_model": "runs/bench-models/tiny-listener",
                                               "settings": {"seed": 1},
                                               "notes": ["runs/a", "relative/runs/b", "no path"]}
    assert learning._cut_to_runs("python -m pipeline train model.reasoner=/a/b/runs/m x=/c/runs/n") == \
        "python -m pipeline train model.reasoner=runs/m x=runs/n"
