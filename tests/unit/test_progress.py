"""The run's progress line, its start -> end summary and its curves PNG (pipeline/progress.py)."""

from __future__ import annotations

import io
import json
import math

from pipeline.progress import Progress, plot_curves, read_rows, summary_lines


def test_the_line_shows_reward_accuracy_listener_and_contradiction() -> None:
    stream = io.StringIO()
    line = Progress(4, stream=stream).update(1, {"reward/mean": 1.25, "reward/accuracy": 0.5,
                                                 "reward/listener": 0.875, "listener/contradiction_rate": 0.25})
    assert "step 2/4 | reward 1.250 | acc 0.50 | listener 0.88 | contradiction 0.25 |" in line
    assert stream.getvalue().strip() == line


def _rows() -> list[dict]:
    rows = [{"step": 0, "eval/accuracy": 0.25, "eval/format_rate": 1.0}]
    for step in range(10):  # reward 0..9, listener nan in step 0 (no usable score)
        rows.append({"step": step, "reward/mean": float(step), "reward/accuracy": step / 10,
                     "reward/listener": math.nan if step == 0 else 0.5})
    rows.append({"step": 10, "eval/accuracy": 0.75, "eval/format_rate": 1.0})
    return rows


def test_summary_is_start_to_end_by_hand() -> None:
    lines = summary_lines(_rows())
    # training figures: the mean of the first and of the last 5 steps; held-out: first and last evaluation
    assert lines[0].startswith("reward                   2.000 -> 7.000  (mean of the first/last 5 steps)")
    assert lines[1].startswith("sampled accuracy         0.200 -> 0.700")
    assert lines[2].startswith("listener p(preferred)    0.500 -> 0.500")  # NaN left out, not averaged in
    assert lines[3] == "held-out accuracy        0.250 -> 0.750  (update 0 -> 10)"
    assert len(lines) == 4  # nothing for metrics the run did not log


def test_curves_png_and_an_empty_run(tmp_path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = plot_curves(read_rows(metrics), tmp_path / "curves.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_rows(tmp_path / "missing.jsonl") == [] and plot_curves([], tmp_path / "none.png") is None
    assert summary_lines([]) == []
