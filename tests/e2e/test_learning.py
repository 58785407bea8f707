"""The learning proof, small enough for CI: the real CLI warm-starts a tiny reasoner on the answer format
(`python -m pipeline sft`), then GRPO (`python -m pipeline train --config configs/learn_cpu.yaml`, listener
off, the `render` synthetic task) runs with held-out greedy evaluation every 5 updates.

Everything is real (Ray, vLLM CPU, DeepSpeed ZeRO-3 on gloo, MLflow on sqlite). About 12 minutes on 2 cores.
Asserted: the warm start writes the format and answers near chance; GRPO raises held-out accuracy by at
least 20 points within GRPO_STEPS updates and keeps the format (bench.learning runs the full version, with
the listener off and on, and records the curves in BENCHMARKS.md).
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

SFT_STEPS = 300  # the default warm start (`tiny://reasoner-sft`), as bench.learning uses
GRPO_STEPS = 100  # configs/learn_cpu.yaml's length: listener off reached 100% at update 70 (BENCHMARKS.md)
EVAL_EVERY = 5  # as in the config: the greedy evaluations are part of the run that bench.learning recorded


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
        f"trainer.eval_every={EVAL_EVERY}", f"trainer.output_dir={run_dir}",
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


def test_grpo_raises_heldout_accuracy_by_20_points_and_keeps_the_format(learning_run: dict) -> None:
    evals = learning_run["eval"]
    assert sorted(evals) == list(range(0, GRPO_STEPS + 1, EVAL_EVERY))
    updates = [row for row in learning_run["train"] if row["learn/skipped"] == 0.0]
    assert len(updates) >= GRPO_STEPS // 2  # sampled answers differ within groups: there is a signal
    rise = evals[GRPO_STEPS]["eval/accuracy"] - evals[0]["eval/accuracy"]
    assert rise >= 0.20, {step: row["eval/accuracy"] for step, row in sorted(evals.items())}
    assert evals[GRPO_STEPS]["eval/format_rate"] >= 0.9
