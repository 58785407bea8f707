"""MLflow tracking that survives an outage: metrics are always written locally and buffered for MLflow.

Every `log_metrics` call appends to `RUN_DIR/metrics.jsonl` first (the local record), then hands the
metrics to a sender thread that flushes everything pending to MLflow, so the training loop never waits on
the store (a sqlite commit or an HTTP round trip took 30-50 ms per call: a tenth of a tiny CPU step, on
the path between two generations). When the tracking server is down, metrics stay pending and are sent at
the next successful flush, with their original step and timestamp; `close` flushes what is left and, if
the server never returns, ends with a warning naming the local file. The MLflow run is created lazily (on
the first flush that reaches the server) and its id is kept in `RUN_DIR/mlflow_run_id`, so a resumed run
logs into the same MLflow run. `RUN_DIR/mlflow_sent_bytes` records how much of metrics.jsonl is on the
server: a run killed during an outage loses its buffer with the process, and the resumed run sends those
rows first. HTTP retries are capped so an outage costs the sender, and `close`, seconds, not minutes.

The URI: `tracking_uri` from config, else `MLFLOW_TRACKING_URI`, else `sqlite:///./mlflow.db`.
Credentials come from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), never from config. Should
one slip into a config value anyway, it never reaches MLflow or the log: params and tags are redacted
(`redact_params`: `user:password@` in URIs, secret query parameters, well-known token formats, and the
values of keys named like secrets), and `Tracker.uri`, the form that is logged and printed, is redacted too.

Names: every metric, param and tag key and every artifact path goes to MLflow through `mlflow_safe_name`
(MLflow accepts only ASCII-ish `[/\w.\- :]` names that are normalised paths, at most 250 characters),
so a dataset category such as "Food & Beverage" cannot fail a run; the original names stay in the
local records (metrics.jsonl, the evaluation report).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stopping import held_stop

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///./mlflow.db"
_BATCH_LIMIT = 1000  # MLflow's log_batch accepts at most 1000 metrics per call
REDACTED = "***"
# A key is secret-like when one of its words (split on . _ - /) is one of these: `max_new_tokens` is not.
_SECRET_WORDS = frozenset({"token", "password", "passwd", "pwd", "secret", "key", "apikey", "credential",
                           "credentials", "auth", "authorization", "cookie", "signature", "sig"})
_URI_USERINFO_RE = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)[^/?#@\s]+@", re.IGNORECASE)
_QUERY_PARAM_RE = re.compile(r"(?P<lead>[?&;](?P<name>[^=&#\s]+)=)(?P<value>[^&#\s]+)")
# Token formats that are secrets wherever they appear (Hugging Face, OpenAI-style, AWS, GitHub, Slack, JWT).
_TOKEN_RE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|(AKIA|ASIA)[0-9A-Z]{16}|"
                       r"gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}|"
                       r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,})")


_UNSAFE_NAME_CHAR_RE = re.compile(r"[^A-Za-z0-9_.\- /]")  # ASCII subset of MLflow's rule, valid on every OS
MAX_NAME_LENGTH = 250  # MLflow's limit on metric, param and tag keys


def mlflow_safe_name(name: str) -> str:
    """`name` as MLflow accepts it: unchanged when already valid, else a stable valid form with a short hash.

    Characters outside `[A-Za-z0-9_.- /]` become `_`; empty, `.` and `..` path segments are dropped (a
    leading `.` gets a `_` before it); when anything changed, 8 hex digits of the original's SHA-1 are
    appended after a `-` (before an extension such as `.json`), so two names that differ only in replaced
    characters stay distinct ("Food & Drink" -> "Food _ Drink-1a2b3c4d").
    """
    text = str(name)
    safe = _UNSAFE_NAME_CHAR_RE.sub("_", text)
    safe = "/".join(part for part in safe.split("/") if part.strip(" ") not in ("", ".", ".."))
    if safe.startswith("."):
        safe = "_" + safe
    if safe == text and 0 < len(safe) <= MAX_NAME_LENGTH and _mlflow_accepts(safe):
        return safe
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    stem, ext = _split_extension(safe)  # an artifact keeps its extension (MLflow tables must end in .json)
    return f"{stem[:MAX_NAME_LENGTH - 9 - len(ext)]}-{digest}{ext}"


def _split_extension(name: str) -> tuple[str, str]:
    match = re.search(r"(?<=[^/.])\.[A-Za-z][A-Za-z0-9]{0,7}\Z", name)
    return (name[:match.start()], match.group(0)) if match else (name, "")


def _mlflow_accepts(name: str) -> bool:
    import posixpath

    return posixpath.normpath(name) == name and not name.startswith(("/", ".."))


def mlflow_safe_keys(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every key made safe by `mlflow_safe_name`; distinct keys never merge (a numbered
    suffix resolves the rare hash collision)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        safe = mlflow_safe_name(key)
        candidate, n = safe, 1
        while candidate in out:
            n += 1
            candidate = f"{safe[:MAX_NAME_LENGTH - 8]}-{n}"
        out[candidate] = value
    return out


def resolve_tracking_uri(configured: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _end_cut_line(metrics_file: Path) -> None:
    """A killed process may leave the last line without its newline: end it, so the next row starts a line."""
    if metrics_file.exists() and metrics_file.stat().st_size:
        with metrics_file.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def unsent_metrics(metrics_file: Path, sent_bytes: int) -> list[tuple[str, float, int, int]]:
    """The metrics of `metrics_file` past its first `sent_bytes` bytes, as pending (key, value, ms, step)
    rows with their original step and timestamp; a line cut short by a killed process is skipped."""
    if not metrics_file.exists() or metrics_file.stat().st_size <= sent_bytes:
        return []
    with metrics_file.open("rb") as f:
        f.seek(sent_bytes)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    pending = []
    for line in lines:
        try:
            row = json.loads(line)
            step, stamp = int(row.pop("step")), int(row.pop("timestamp_ms"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        pending += [(k, float(v), stamp, step) for k, v in mlflow_safe_keys(row).items()
                    if isinstance(v, (int, float))]
    return pending


def secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret: one of its words is token, password, secret, key, ..."""
    return any(word in _SECRET_WORDS for word in re.split(r"[._\-/\s]+", key.lower()))


def redact_value(value: str) -> str:
    """`value` with URI credentials, secret query parameters and well-known tokens replaced by ***."""
    value = _URI_USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
    value = _QUERY_PARAM_RE.sub(lambda m: m.group("lead") + REDACTED if secret_key(m.group("name")) else m.group(0),
                                value)  # ?access_token=, &X-Amz-Signature=, &sig= (named like a secret)
    return _TOKEN_RE.sub(REDACTED, value)


def redact_params(params: dict[str, str]) -> dict[str, str]:
    """Params or tags safe to log: a secret-named key keeps its name but not its value (unless empty)."""
    return {key: (REDACTED if value and secret_key(key) else redact_value(value)) for key, value in params.items()}


def _cap_http_retries() -> None:
    # MLflow's defaults retry a dead server for minutes; one step should wait seconds at most.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@dataclass
class _Pending:
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)  # key, value, ms, step
    tables: list[tuple[str, str]] = field(default_factory=list)  # artifact file, the table as JSON
    tags: dict[str, str] = field(default_factory=dict)


class Tracker:
    """Local-first, outage-tolerant MLflow logging for one training run."""

    def __init__(self, run_dir: Path, tracking_uri: str, experiment: str, run_name: str,
                 params: dict[str, str], tags: dict[str, str]) -> None:
        _cap_http_retries()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._uri = resolve_tracking_uri(tracking_uri)  # what the client connects to
        self.uri = redact_value(self._uri)  # what is logged and printed
        self.experiment, self.run_name = experiment, run_name
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self._run_id_file = self.run_dir / "mlflow_run_id"
        self.run_id: str | None = self._run_id_file.read_text().strip() if self._run_id_file.exists() else None
        self._params = mlflow_safe_keys(redact_params(params))
        self._pending = _Pending(tags=mlflow_safe_keys(redact_params(tags)))
        # How much of metrics.jsonl is known to be on the server: a run that died while the server was down
        # (its buffer lost with the process) sends the rest when it is resumed.
        self._sent_file = self.run_dir / "mlflow_sent_bytes"
        _end_cut_line(self.metrics_file)
        self._pending.metrics = unsent_metrics(self.metrics_file, self._sent_bytes())
        self._in_flight = _Pending()  # taken by the flush under way, back into _pending if it fails
        self._queued_bytes = self._file_size()  # metrics.jsonl up to here is sent or pending
        self.flush_failures = 0
        self._client = None
        self._lock = threading.Lock()  # _pending, _in_flight, _queued_bytes
        self._flushing = threading.Lock()  # one flush at a time: the sender's, start-up's or close's
        self._wake = threading.Event()
        self._closing = False
        self._sender: threading.Thread | None = None
        self._tables_registered: list[dict[str, str]] | None = None  # the run's table list, once read

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        with self.metrics_file.open("a") as out:
            out.write(json.dumps({"step": step, "timestamp_ms": stamp, **metrics}) + "\n")
        with self._lock:
            self._pending.metrics += [(k, float(v), stamp, step) for k, v in mlflow_safe_keys(metrics).items()]
            self._queued_bytes = self._file_size()
        self._send_soon()

    def log_table(self, artifact_file: str, columns: dict[str, list[Any]]) -> None:
        """A table (column name -> values) as an MLflow table artifact; also kept in the run dir."""
        text = table_json(columns)  # a malformed table fails here, in the caller, not in every later send
        local = self.run_dir / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(columns, default=str))
        with self._lock:
            self._pending.tables.append((mlflow_safe_name(artifact_file), text))
        self._send_soon()

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self._pending.tags.update(mlflow_safe_keys(redact_params(tags)))
        self._send_soon()

    def flush(self) -> bool:
        """Send everything pending now; False (and keep it pending) when the server cannot be reached."""
        with self._flushing:
            with self._lock:
                batch, self._pending, self._in_flight = self._pending, _Pending(), self._pending
                covered = self._queued_bytes
            try:
                with held_stop():  # a stop signal waits for the write: one cut short left the sqlite store locked
                    self._send(self._ensure_run(), batch)
                    self._mark_sent(covered)
            except Exception as exc:  # any transport or server error: keep the data, retry later
                self.flush_failures += 1
                with self._lock:  # what was not sent goes back in front of what was logged meanwhile
                    self._pending = _Pending(metrics=batch.metrics + self._pending.metrics,
                                             tables=batch.tables + self._pending.tables,
                                             tags={**batch.tags, **self._pending.tags})
                    self._in_flight = _Pending()
                log.warning("MLflow at %s unreachable (%s); %d metrics kept for later", self.uri,
                            type(exc).__name__, len(self._pending.metrics))
                return False
            with self._lock:
                self._in_flight = _Pending()
            return True

    @property
    def pending_metrics(self) -> int:
        """Metrics not yet on the server (a flush under way counts until it succeeds)."""
        with self._lock:
            return len(self._pending.metrics) + len(self._in_flight.metrics)

    def _send_soon(self) -> None:
        """Wake the sender thread (started on first use); a failed send is retried at the next wake."""
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
            self._sender.start()
        self._wake.set()

    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            self.flush()

    def close(self, status: str = "FINISHED") -> bool:
        """Final flush and end the run. False: the server never came back; metrics are in metrics_file."""
        if self._sender is not None:  # let a send under way finish; close's own flush sends the rest
            self._closing = True
            self._wake.set()
            self._sender.join()
            self._sender, self._closing = None, False
        ok = self.flush()
        if ok and self.run_id is not None:
            try:
                with held_stop():
                    self._client.set_terminated(self.run_id, status=status)
            except Exception:  # the metrics are in; a missing end time is not worth failing the run for
                log.warning("could not mark MLflow run %s as %s", self.run_id, status)
        if not ok:
            log.warning("MLflow at %s never came back: %d metrics were not sent; every metric is saved in %s",
                        self.uri, self.pending_metrics, self.metrics_file)
        return ok

    def _ensure_run(self):
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(tracking_uri=self._uri)
        if self.run_id is None:
            experiment = self._client.get_experiment_by_name(self.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self._client.create_experiment(self.experiment))
            run = self._client.create_run(experiment_id, run_name=self.run_name or None)
            self.run_id = run.info.run_id
            self._run_id_file.write_text(self.run_id + "\n")
            self._send_params(self._client)
        return self._client

    def _sent_bytes(self) -> int:
        try:
            return int(self._sent_file.read_text())
        except (FileNotFoundError, ValueError):
            return 0  # nothing known to be sent: the store skips a metric it already has

    def _file_size(self) -> int:
        return self.metrics_file.stat().st_size if self.metrics_file.exists() else 0

    def _mark_sent(self, covered_bytes: int) -> None:
        """metrics.jsonl up to `covered_bytes` is on the server: record it (atomically)."""
        if self.metrics_file.exists():
            tmp = self._sent_file.with_suffix(".tmp")
            tmp.write_text(str(covered_bytes))
            os.replace(tmp, self._sent_file)

    def _send_params(self, client) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(self._params.items())]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            client.log_batch(self.run_id, params=items[start:start + 100])

    def _send(self, client, batch: _Pending) -> None:
        """Send `batch`, removing from it what was sent (what is left on an error is retried)."""
        from mlflow.entities import Metric, RunTag

        if batch.tags:
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in batch.tags.items()])
            batch.tags = {}
        while batch.metrics:
            chunk = batch.metrics[:_BATCH_LIMIT]
            client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v, ms, step in chunk])
            del batch.metrics[:len(chunk)]
        while batch.tables:
            artifact_file, text = batch.tables[0]
            client.log_text(self.run_id, text, artifact_file)
            self._register_table(client, artifact_file)
            batch.tables.pop(0)

    def _register_table(self, client, artifact_file: str) -> None:
        """List the table in the run's `mlflow.loggedArtifacts` tag (what `mlflow.load_table` and the UI's
        table view read), newest kept where the tag's length limit cuts the list (see `table_registry`)."""
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        if self._tables_registered is None:  # once per process: a resumed run keeps its earlier entries
            current = client.get_run(self.run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]")
            try:
                registered = json.loads(current)
            except ValueError:  # cut short by an older MLflow client's log_table: start afresh
                registered = []
            self._tables_registered = registered if isinstance(registered, list) else []
        self._tables_registered = table_registry(self._tables_registered, artifact_file)
        client.set_tag(self.run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(self._tables_registered))


MAX_TAG_VALUE_LENGTH = 8000  # MLflow's limit on a tag's value (mlflow.utils.validation)


def table_json(columns: dict[str, list[Any]]) -> str:
    """A table (column name -> values, all one length) in MLflow's table format: pandas' `split` orient."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"table columns differ in length: { {k: len(v) for k, v in columns.items()} }")
    return json.dumps({"columns": list(columns), "data": [list(row) for row in zip(*columns.values())]},
                      default=str)


def table_registry(entries: list[dict[str, str]], artifact_file: str,
                   limit: int = MAX_TAG_VALUE_LENGTH) -> list[dict[str, str]]:
    """`entries` (the tag's list of logged tables) with `artifact_file` added, dropping the oldest until
    its JSON fits in `limit` characters. MLflow's own `log_table` appends without a bound: one sample table
    per step filled the tag at the 147th table and every later flush failed (pure; tested by hand in
    tests/unit/test_tracking_tables.py)."""
    entry = {"path": artifact_file, "type": "table"}
    kept = [e for e in entries if e != entry] + [entry]
    while len(kept) > 1 and len(json.dumps(kept)) > limit:
        kept.pop(0)
    return kept
