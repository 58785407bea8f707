"""The learning proof, small enough for CI, with the listener on: from the session's warm starts
(tests/conftest.py: a tiny reasoner warm-started on the answer format, which describes both images, swapping
the two descriptions in half its targets, and answers by a coin; and a tiny listener trained on its own
describe-then-judge data; `pipeline.sft` with the default settings, as `python -m pipeline warm-starts`
builds them), GRPO (`python -m pipeline train --config configs/learn_cpu.yaml`, listener on, the
`render-saturated` synthetic task) runs with held-out and OOD (`render-white`) greedy evaluation, each
scored by the listener.

Everything is real (Ray, vLLM CPU, DeepSpeed on gloo, MLflow on sqlite). Asserted: the warm start writes
the format and answers near chance; GRPO raises held-out accuracy by at least 20 points within GRPO_STEPS
updates and keeps the format; the listener's reward rises by at least 0.1 (the reasoner comes to describe
the images the right way round, so the listener, which reads the descriptions, picks the preferred image:
with this warm start that rise is built in, docs/listener.md); every evaluation carries the listener's
agreement split. Whether the listener changes what is learned is bench.learning's question, from a
faithful warm start (docs/listener.md), not this test's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

GRPO_STEPS = 40
EVAL_EVERY = 5  # as in the config, so the run is the measured one's first GRPO_STEPS updates
EVAL_PAIRS = 64  # per split (the config's 256 is the experiment's; CI time)


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": ""}


def cli(*args: str, timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                            timeout=timeout, env=_env())
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


@pytest.fixture(scope="module")
def learning_run(tmp_path_factory, tiny_reasoner_sft_dir: Path, tiny_listener_sft_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("learning")
    warm = {"reasoner": tiny_reasoner_sft_dir, "listener": tiny_listener_sft_dir}
    run_dir = root / "run"
    cli("train", "--config", str(REPO / "configs" / "learn_cpu.yaml"), f"model.reasoner={warm['reasoner']}",
        f"model.listener={warm['listener']}", "reward.w_listener=0.5", f"trainer.steps={GRPO_STEPS}",
        f"trainer.eval_every={EVAL_EVERY}", f"data.eval_pairs={EVAL_PAIRS}", f"trainer.output_dir={run_dir}",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", timeout=1800)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": run_dir, "manifests": {role: json.loads((warm[role] / "sft_manifest.json").read_text())
                          for role in ("reasoner", "listener")},
            "eval": {row["step"]: row for row in rows if "eval/accuracy" in row},
            "train": [row for row in rows if "reward/mean" in row]}


def test_warm_start_writes_the_format_and_answers_near_chance(learning_run: dict) -> None:
    manifests = learning_run["manifests"]
    assert manifests["reasoner"]["settings"]["answer_accuracy"] == 0.5
    assert manifests["reasoner"]["settings"]["faithful_rate"] == 0.5
    assert (manifests["reasoner"]["role"], manifests["listener"]["role"]) == ("reasoner", "listener")
    start = learning_run["eval"][0]
    assert start["eval/format_rate"] >= 0.9
    assert start["eval/accuracy"] <= 0.65


def test_grpo_with_the_listener_raises_heldout_accuracy_and_the_listeners_reward(learning_run: dict) -> None:
    evals = learning_run["eval"]
    assert sorted(evals) == list(range(0, GRPO_STEPS + 1, EVAL_EVERY))
    updates = [row for row in learning_run["train"] if row["learn/skipped"] == 0.0]
    assert len(updates) >= GRPO_STEPS // 2  # sampled answers differ within groups: there is a signal
    rise = evals[GRPO_STEPS]["eval/accuracy"] - evals[0]["eval/accuracy"]
    assert rise >= 0.20, {step: row["eval/accuracy"] for step, row in sorted(evals.items())}
    assert evals[GRPO_STEPS]["eval/format_rate"] >= 0.9
    # the listener took part: a defined reward in (0, 1) at every step (its p of the preferred image)
    listener = [row["reward/listener"] for row in learning_run["train"]]
    assert len(listener) == GRPO_STEPS and all(not math.isnan(v) and 0.0 < v < 1.0 for v in listener)
    # ... and it rose: the reasoner's descriptions came to convince it (issue 15's bench.learning, staleness 1,
    # seed 0: 0.40 over the first 10 updates, 0.88 over the last 10)
    first, last = sum(listener[:10]) / 10, sum(listener[-10:]) / 10
    assert last >= first + 0.1, [round(v, 3) for v in listener]


def test_every_evaluation_carries_the_listeners_agreement_split(learning_run: dict) -> None:
    for step, row in learning_run["eval"].items():
        for prefix in ("eval", "eval_ood"):
            judged = row[f"{prefix}/listener/judged"]
            assert 0 < judged <= round(row[f"{prefix}/format_rate"] * EVAL_PAIRS), (step, prefix)
            rates = row[f"{prefix}/listener/agree_rate"] + row[f"{prefix}/listener/contradiction_rate"]
            assert 0.0 < rates <= 1.0 + 1e-9
    end = learning_run["eval"][GRPO_STEPS]
    # right answers agree with a listener that believes faithful descriptions: the agreeing ones are right
    assert end["eval/listener/accuracy_when_agree"] >= 0.9
    table = json.loads((learning_run["run_dir"] / "eval_ood" / f"step_{GRPO_STEPS:06d}.json").read_text())
    assert len(table["text"]) == EVAL_PAIRS  # the completions themselves are kept, for another listener
