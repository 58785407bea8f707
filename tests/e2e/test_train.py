"""The product's main job end to end: `python -m pipeline train` on CPU, tracked in MLflow, resumable.

Everything is real: a local Ray cluster started by the driver, vLLM CPU engines for rollout and listener,
DeepSpeed ZeRO-3 on gloo, MLflow on a sqlite store. The reasoner is the format warm start (built once per
test session, `tiny_reasoner_sft_dir`), so every step is a learning step: none is skipped, the loss is not
zero and the checkpoint's weights differ from the start; the listener is built by the run itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, tiny_reasoner_sft_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("train") / "run"
    result = run_train(run_dir, "trainer.steps=2", f"model.reasoner={tiny_reasoner_sft_dir}", *LEARNING)
    assert "step 2/2" in result.stderr  # the progress bar
    assert "MLflow UI" in result.stdout
    return run_dir


def test_every_metric_is_logged_for_every_step(default_run: Path) -> None:
    run_id = (default_run / "mlflow_run_id").read_text().strip()
    steps = metric_steps(f"sqlite:///{default_run.parent}/mlflow.db", run_id)
    assert {key: value for key, value in steps.items() if value != [0, 1]} == {}


def test_every_step_learns_and_the_weights_change(default_run: Path, tiny_reasoner_sft_dir: Path) -> None:
    assert_every_step_learned(train_rows(default_run))
    changed = changed_tensors(tiny_reasoner_sft_dir, latest_checkpoint(default_run / "checkpoints") / "policy")
    assert changed and not [name for name in changed if name.startswith("visual")]  # learner.freeze_vision


def test_run_has_config_params_version_tags_and_sample_tables(default_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{default_run.parent}/mlflow.db")
    run = client.get_run((default_run / "mlflow_run_id").read_text().strip())
    assert run.data.params["trainer.steps"] == "2"
    assert run.data.params["reward.w_listener"] == "0.5"
    for tag in ("version/torch", "version/vllm", "version/deepspeed", "version/ray", "git_commit"):
        assert run.data.tags.get(tag), tag
    assert run.info.status == "FINISHED"
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert tables == {"samples/step_000000.json", "samples/step_000001.json"}
    assert Path(run.data.tags["checkpoint"]).is_dir()


VLLM_LOAD = r"""
import sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", max_model_len=1024, seed=0)
out = llm.generate(["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"], SamplingParams(max_tokens=4))
print("TOKENS", len(out[0].outputs[0].token_ids))
"""


def test_checkpoint_loads_in_transformers_and_vllm(default_run: Path) -> None:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    checkpoint = latest_checkpoint(default_run / "checkpoints")
    assert checkpoint is not None and checkpoint.name.endswith("2")
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


def test_stop_after_a_checkpoint_then_resume_continues_step_and_data(tmp_path: Path, tiny_reasoner_sft_dir: Path,
                                                                    tiny_listener_dir: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    # Steps long enough (8 pairs x G=8) that the stop lands mid-run.
    overrides = ("trainer.steps=6", "data.pairs_per_step=8",
                 f"model.reasoner={tiny_reasoner_sft_dir}", f"model.listener={tiny_listener_dir}", *LEARNING)
    process = subprocess.Popen(train_command(run_dir, *overrides), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=(tmp_path / "first.log").open("w"), env={**os.environ, "RAY_ADDRESS": ""})
    manifest = run_dir / "checkpoints" / step_dir_name(1) / MANIFEST
    deadline = time.monotonic() + 900
    while not manifest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert manifest.exists(), (tmp_path / "first.log").read_text()[-4000:]
    process.send_signal(signal.SIGTERM)  # what `ray job stop` and Kubernetes send; handled like Ctrl-C
    assert process.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-4000:]
    first_steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert first_steps[0] == 0 and first_steps[-1] < 5, "the first run was meant to stop before the end"
    client = MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    # The last complete checkpoint counts the steps the first run finished; the resumed run starts right
    # there (a step stopped before its checkpoint is run again) and goes to the end.
    start = json.loads((latest_checkpoint(run_dir / "checkpoints") / MANIFEST).read_text())["step"]
    assert 1 <= start <= first_steps[-1] + 1
    run_train(run_dir, *overrides, resume=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed_steps = [r["step"] for r in rows[len(first_steps):]]
    assert resumed_steps == list(range(start, 6))
    assert latest_checkpoint(run_dir / "checkpoints").name == step_dir_name(6)
    assert resumed_steps[-1] == 5
    assert_every_step_learned(rows)
    # The same MLflow run, reopened and finished: the resumed steps' metrics land in it.
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert set(resumed_steps) <= {m.step for m in client.get_metric_history(run_id, "loss")}
    # The data position continues: each resumed step trains on the stream's batch of that step.
    cfg = load_config(None, list(overrides))
    source = PairSource.from_config(cfg.data, cfg.model)
    batches = [[p.pair_id for p in source.next_batch(cfg.data.pairs_per_step)] for _ in range(6)]
    for step in range(resumed_steps[0], 6):
        assert _pair_ids(run_dir, step) == batches[step]
