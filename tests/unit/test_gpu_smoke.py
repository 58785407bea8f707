"""bench.gpu_smoke without a GPU: the dry run, the section-by-section JSON (errors kept per section, earlier
sections never lost), the ratio arithmetic and the learner settings it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_smoke

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_lists_every_check_and_exits_0_without_writing(tmp_path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_smoke", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line and not line.startswith("(")]
    assert listed == [name for name, _, _ in gpu_smoke.SECTIONS]
    assert {"versions", "bucket_pack", "nccl_group", "checkpoint", "reference_step", "zero3_step",
            "ratio"} <= set(listed)
    assert not out.exists()


def test_sections_are_written_one_by_one_and_an_error_stays_in_its_section(tmp_path, monkeypatch) -> None:
    out = tmp_path / "smoke.json"
    seen_on_disk: list[list[str]] = []

    def first(ctx):
        return {"value": 1}

    def broken(ctx):
        seen_on_disk.append(list(json.loads(out.read_text())["sections"]))  # `first` is already on disk
        raise RuntimeError("no NCCL here")

    def skipped(ctx):
        return {"skipped": "vLLM is not installed here"}

    monkeypatch.setattr(gpu_smoke, "SECTIONS", [("first", "", first), ("broken", "", broken),
                                                ("optional", "", skipped), ("last", "", first)])
    results = gpu_smoke.run_sections({"results": {"sections": {}}}, out)
    on_disk = json.loads(out.read_text())["sections"]
    assert seen_on_disk == [["first"]]
    assert [on_disk[n]["status"] for n in ("first", "broken", "optional", "last")] == ["ok", "error", "skipped", "ok"]
    assert on_disk["broken"]["error"] == "RuntimeError: no NCCL here" and on_disk["broken"]["traceback"]
    assert on_disk["first"]["value"] == 1 and results["sections"] == on_disk


def test_ratio_is_ours_over_the_reference_against_the_goal() -> None:
    sections = {"reference_step": {"tokens_per_s": 1000.0}, "zero3_step": {"tokens_per_s": 850.0},
                "zero3_ds_defaults": {"tokens_per_s": 230.0}}
    ratio = gpu_smoke._section_ratio({"results": {"sections": sections}})
    assert ratio["zero3_step"] == pytest.approx(0.85) and ratio["zero3_ds_defaults"] == pytest.approx(0.23)
    assert ratio["meets_goal"] is True and ratio["goal"] == 0.8
    missing = gpu_smoke._section_ratio({"results": {"sections": {"zero3_step": {"tokens_per_s": 5.0}}}})
    assert missing["zero3_step"] is None and missing["meets_goal"] is False


def test_the_learner_sections_run_the_7b_configs_settings_on_one_rank() -> None:
    import torch

    from bench.gpu_smoke_work import learner_config
    from pipeline.config import LearnerConfig, load_config

    cfg = load_config(str(gpu_smoke.CONFIG))
    ctx = {"cfg": cfg, "tiny": False, "device": torch.device("cuda")}
    ours, defaults = learner_config(ctx), learner_config(ctx, ds_defaults=True)
    assert ours.num_ranks == 1 and ours.num_gpus == 1 and ours.zero_stage == 3
    assert ours.activation_checkpointing and ours.micro_batch_tokens == cfg.learner.micro_batch_tokens
    assert ours.zero3_prefetch_bucket_size == cfg.learner.zero3_prefetch_bucket_size
    assert defaults.zero3_prefetch_bucket_size == LearnerConfig().zero3_prefetch_bucket_size
    assert defaults.zero3_persistence_threshold == LearnerConfig().zero3_persistence_threshold
