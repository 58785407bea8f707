"""The learning proof, small enough for CI: the real CLI warm-starts a tiny reasoner on the answer format
(`python -m pipeline sft`), then GRPO (`python -m pipeline train --config configs/learn_cpu.yaml`, listener
off) runs with held-out greedy evaluation before and after.

Everything is real (Ray, vLLM CPU, DeepSpeed ZeRO-3 on gloo, MLflow on sqlite). About 5 minutes on 2 cores.

What holds today, and is asserted: the warm start writes the format and answers near chance, and GRPO
updates the policy on it while keeping the format. What does not yet hold, and so is not in the suite:
the 20-point rise of held-out accuracy (issue 9). The tiny checkpoints (1M and, tried, 4M parameters) do
not learn the prompt-to-image comparison the task needs within a CPU budget, even by supervised learning
of the answer from correct descriptions (BENCHMARKS.md, "Learning proof"); add the rise assertion here
once a configuration learns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

SFT_STEPS = 150
GRPO_STEPS = 20


def cli(*args: str, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                            timeout=timeout, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("learning")
    cli("make-tiny", "--out", str(root / "tiny"), timeout=300)
    cli("sft", "--model", str(root / "tiny"), "--out", str(root / "sft"), "--steps", str(SFT_STEPS), timeout=600)
    run_dir = root / "run"
    cli("train", "--config", str(REPO / "configs" / "learn_cpu.yaml"), f"model.reasoner={root / 'sft'}",
        f"model.listener={root / 'sft'}", "reward.w_listener=0", f"trainer.steps={GRPO_STEPS}",
        f"trainer.eval_every={GRPO_STEPS}", f"trainer.output_dir={run_dir}",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", timeout=900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"manifest": json.loads((root / "sft" / "sft_manifest.json").read_text()),
            "eval": {row["step"]: row for row in rows if "eval/accuracy" in row},
            "train": [row for row in rows if "reward/mean" in row]}


def test_warm_start_writes_the_format_and_answers_near_chance(learning_run: dict) -> None:
    assert learning_run["manifest"]["settings"]["answer_accuracy"] == 0.5
    start = learning_run["eval"][0]
    assert start["eval/format_rate"] >= 0.9
    assert start["eval/accuracy"] <= 0.65


def test_grpo_updates_the_policy_and_keeps_the_format(learning_run: dict) -> None:
    assert sorted(learning_run["eval"]) == [0, GRPO_STEPS]
    updates = [row for row in learning_run["train"] if row["learn/skipped"] == 0.0]
    assert len(updates) >= GRPO_STEPS // 2  # sampled answers differ within groups: there is a signal
    assert learning_run["eval"][GRPO_STEPS]["eval/format_rate"] >= 0.8
