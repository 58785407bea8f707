"""No secret reaches MLflow or the log: a config carrying credentials, tracked into a real MLflow store.

The run's params are the flattened config (as the driver builds them), with credentials planted where a
careless user would put them: user:password@ in the tracking URI and a model URL, a signed data URL, a
Hugging Face token in the run name, a secret-named tag. Everything logged to a real sqlite MLflow store is
read back and searched for every planted secret; the log lines of a tracker whose server is down (its URI
with a password in it) are searched too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.config import flatten_config, load_config
from pipeline.tracking import REDACTED, Tracker

pytestmark = pytest.mark.integration

SECRETS = ["hunter2-pw", "s3cret-pw", "sig-abcdef123", "hf_AbCdEfGhIjKlMnOpQrStUvWx12", "tok-xyz-789"]
PLANTED = ["tracking.tracking_uri=http://alice:hunter2-pw@mlflow.internal:5000",
           "model.reasoner=https://bob:s3cret-pw@models.internal/ckpt",
           "data.source=https://data.internal/pairs.parquet?X-Amz-Signature=sig-abcdef123",
           "tracking.run_name=run-hf_AbCdEfGhIjKlMnOpQrStUvWx12"]


def _everything_logged(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    return repr(run.data.params) + repr(run.data.tags) + repr(run.info)


def test_params_and_tags_logged_to_a_real_store_hold_no_secret(tmp_path: Path, caplog) -> None:
    cfg = load_config(None, PLANTED)
    params = flatten_config(cfg)
    assert all(any(secret in value for value in params.values()) for secret in SECRETS[:4])  # planted for real
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(tmp_path / "run", uri, cfg.tracking.experiment, run_name="secrets", params=params,
                      tags={"git_commit": "abc", "auth_token": "tok-xyz-789"})
    with caplog.at_level(logging.DEBUG):
        tracker.log_metrics(0, {"loss": 1.0})
        tracker.set_tags({"checkpoint": "runs/x/checkpoints/step_000001", "hf_token": "tok-xyz-789"})
        assert tracker.close()
    logged = _everything_logged(uri, tracker.run_id)
    assert [secret for secret in SECRETS if secret in logged] == []
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(tracker.run_id)
    # Redaction keeps what is useful: the hosts, the shape of the URI, every ordinary param.
    assert run.data.params["tracking.tracking_uri"] == f"http://{REDACTED}@mlflow.internal:5000"
    assert run.data.params["model.reasoner"] == f"https://{REDACTED}@models.internal/ckpt"
    assert run.data.params["trainer.steps"] == str(cfg.trainer.steps)
    assert len(run.data.params) == len(params)
    assert run.data.tags["auth_token"] == REDACTED and run.data.tags["git_commit"] == "abc"
    assert [secret for secret in SECRETS if secret in caplog.text] == []


def test_an_unreachable_server_with_credentials_in_its_uri_is_logged_without_them(tmp_path: Path, caplog) -> None:
    tracker = Tracker(tmp_path / "run", "http://alice:hunter2-pw@127.0.0.1:9", "exp", run_name="down",
                      params={}, tags={})
    with caplog.at_level(logging.WARNING):
        tracker.log_metrics(0, {"loss": 1.0})
        assert tracker.close() is False
    assert "unreachable" in caplog.text and "127.0.0.1:9" in caplog.text
    assert "hunter2-pw" not in caplog.text and "hunter2-pw" not in tracker.uri
