"""The product's main job end to end: `python -m pipeline train` on CPU, tracked in MLflow, resumable.

Everything is real: a local Ray cluster started by the driver, vLLM CPU engines for rollout and listener,
DeepSpeed ZeRO-3 on gloo, MLflow on a sqlite store. The reasoner is the format warm start (built once per
test session, `tiny_reasoner_sft_dir`), so every step is a learning step: none is skipped, the loss is not
zero and the checkpoint's weights differ from the start; the listener is built by the run itself.

One run serves the module: it is stopped with SIGTERM after its first checkpoint and resumed to the end
(`stopped_and_resumed`); the other tests check what the finished run logged and wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests_e2e_helpers import LEARNING, assert_every_step_learned, changed_tensors, metric_steps, train_rows

from actors.checkpoint import MANIFEST, latest_checkpoint, step_dir_name
from pipeline.config import load_config
from pipeline.data import PairSource

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e

def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", f"trainer.output_dir={run_dir}",
            f"tracking.tracking_uri=sqlite:///{run_dir.parent}/mlflow.db", *overrides]


def run_train(run_dir: Path, *overrides: str, resume: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    command = train_command(run_dir, *overrides) + (["--resume", str(run_dir)] if resume else [])
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    return result


STEPS = 6
# Steps long enough (8 pairs x G=8) that the stop lands mid-run.
OVERRIDES = (f"trainer.steps={STEPS}", "data.pairs_per_step=8", *LEARNING)


@dataclass(frozen=True)
class StoppedAndResumed:
    run_dir: Path
    run_id: str
    first_steps: list[int]  # the steps the first run logged before it was stopped
    first_status: str  # its MLflow run's status then
    start: int  # the step of the checkpoint the resumed run started from
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory, tiny_reasoner_sft_dir: Path) -> StoppedAndResumed:
    """A run stopped with SIGTERM (what `ray job stop` and Kubernetes send; handled like Ctrl-C) once its
    first checkpoint is complete, then resumed with `--resume` to the end."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path_factory.mktemp("train") / "run"
    overrides = (*OVERRIDES, f"model.reasoner={tiny_reasoner_sft_dir}")
    log = run_dir.parent / "first.log"
    process = subprocess.Popen(train_command(run_dir, *overrides), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=log.open("w"), env={**os.environ, "RAY_ADDRESS": ""})
    manifest = run_dir / "checkpoints" / step_dir_name(1) / MANIFEST
    deadline = time.monotonic() + 900
    while not manifest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert manifest.exists(), log.read_text()[-4000:]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=180) == 130, log.read_text()[-4000:]
    first_steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    first_status = MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db").get_run(run_id).info.status
    start = json.loads((latest_checkpoint(run_dir / "checkpoints") / MANIFEST).read_text())["step"]
    resumed = run_train(run_dir, *overrides, resume=True)
    return StoppedAndResumed(run_dir, run_id, first_steps, first_status, start, resumed)


def test_every_metric_is_logged_for_every_step(stopped_and_resumed: StoppedAndResumed) -> None:
    run = stopped_and_resumed
    steps = metric_steps(f"sqlite:///{run.run_dir.parent}/mlflow.db", run.run_id)
    # A step the stop interrupted before its checkpoint runs again after the resume: logged twice.
    assert {key: value for key, value in steps.items() if sorted(set(value)) != list(range(STEPS))} == {}


def test_every_step_learns_and_the_weights_change(stopped_and_resumed: StoppedAndResumed,
                                                  tiny_reasoner_sft_dir: Path) -> None:
    run_dir = stopped_and_resumed.run_dir
    assert_every_step_learned(train_rows(run_dir))
    changed = changed_tensors(tiny_reasoner_sft_dir, latest_checkpoint(run_dir / "checkpoints") / "policy")
    assert changed and not [name for name in changed if name.startswith("visual")]  # learner.freeze_vision


def test_run_has_config_params_version_tags_and_sample_tables(stopped_and_resumed: StoppedAndResumed) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = stopped_and_resumed.run_dir
    assert f"step {STEPS}/{STEPS}" in stopped_and_resumed.resumed.stderr  # the progress bar
    assert "MLflow UI" in stopped_and_resumed.resumed.stdout
    client = MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    run = client.get_run(stopped_and_resumed.run_id)
    assert run.data.params["trainer.steps"] == str(STEPS)
    assert run.data.params["reward.w_listener"] == "0.5"
    for tag in ("version/torch", "version/vllm", "version/deepspeed", "version/ray", "git_commit"):
        assert run.data.tags.get(tag), tag
    assert run.info.status == "FINISHED"
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert tables == {f"samples/step_{step:06d}.json" for step in range(STEPS)}
    assert Path(run.data.tags["checkpoint"]).is_dir()


VLLM_LOAD = r"""
import sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", max_model_len=1024, seed=0)
out = llm.generate(["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"], SamplingParams(max_tokens=4))
print("TOKENS", len(out[0].outputs[0].token_ids))
"""


def test_checkpoint_loads_in_transformers_and_vllm(stopped_and_resumed: StoppedAndResumed) -> None:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    checkpoint = latest_checkpoint(stopped_and_resumed.run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.name == step_dir_name(STEPS)
    policy = checkpoint / "policy"
    Qwen2_5_VLForConditionalGeneration.from_pretrained(policy)
    AutoProcessor.from_pretrained(policy)
    result = subprocess.run([sys.executable, "-c", VLLM_LOAD, str(policy)], capture_output=True, text=True,
                            cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TOKENS 4" in result.stdout


def _pair_ids(run_dir: Path, step: int) -> list[str]:
    table = json.loads((run_dir / "samples" / f"step_{step:06d}.json").read_text())
    return list(dict.fromkeys(table["pair_id"]))


def test_stop_after_a_checkpoint_then_resume_continues_step_and_data(stopped_and_resumed: StoppedAndResumed,
                                                                    tiny_reasoner_sft_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    run, run_dir = stopped_and_resumed, stopped_and_resumed.run_dir
    assert run.first_steps[0] == 0 and run.first_steps[-1] < STEPS - 1, "the first run was meant to stop before the end"
    assert run.first_status == "KILLED"
    # The last complete checkpoint counts the steps the first run finished; the resumed run starts right
    # there (a step stopped before its checkpoint is run again) and goes to the end.
    assert 1 <= run.start <= run.first_steps[-1] + 1
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed_steps = [r["step"] for r in rows[len(run.first_steps):]]
    assert resumed_steps == list(range(run.start, STEPS))
    assert latest_checkpoint(run_dir / "checkpoints").name == step_dir_name(STEPS)
    assert_every_step_learned(rows)
    # The same MLflow run, reopened and finished: the resumed steps' metrics land in it.
    client = MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    assert (run_dir / "mlflow_run_id").read_text().strip() == run.run_id
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert set(resumed_steps) <= {m.step for m in client.get_metric_history(run.run_id, "loss")}
    # The data position continues: each resumed step trains on the stream's batch of that step.
    cfg = load_config(None, [*OVERRIDES, f"model.reasoner={tiny_reasoner_sft_dir}"])
    source = PairSource.from_config(cfg.data, cfg.model)
    batches = [[p.pair_id for p in source.next_batch(cfg.data.pairs_per_step)] for _ in range(STEPS)]
    for step in range(resumed_steps[0], STEPS):
        assert _pair_ids(run_dir, step) == batches[step]
