"""What a training run prints: a progress line per step, and at the end a start -> end summary and a PNG.

The line: step, reward, sampled accuracy, the listener's reward (its p of the preferred image), the
contradiction rate, step time, ETA. The summary reads the run's local metrics file (`metrics.jsonl`, the
same rows MLflow gets): training figures averaged over the first and the last few steps, the held-out
figures at the first and the last evaluation; the curves are drawn to RUN_DIR/curves.png.
"""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TextIO

# (metric, label) of the summary and of the PNG's panels; eval_* rows are logged at updates applied
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "sampled accuracy"),
    ("reward/listener", "listener p(preferred)"),
    ("listener/contradiction_rate", "contradiction rate"),
    ("eval/accuracy", "held-out accuracy"),
    ("eval_ood/accuracy", "OOD held-out accuracy"),
)
SUMMARY_WINDOW = 5  # training steps averaged at each end (noisy per step); evaluations are taken as they are


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, stream: TextIO | None = None) -> None:
        self.total, self.start, self.stream = total_steps, start_step, stream or sys.stderr
        self.started = time.monotonic()

    def update(self, step: int, metrics: dict[str, float]) -> str:
        """Print and return the line for the finished `step` (0-based)."""
        done = step + 1 - self.start
        per_step = (time.monotonic() - self.started) / max(done, 1)
        eta = timedelta(seconds=round(per_step * (self.total - step - 1)))
        filled = int(20 * (step + 1) / self.total)
        line = (f"[{'#' * filled}{'.' * (20 - filled)}] step {step + 1}/{self.total} | "
                f"reward {metrics.get('reward/mean', float('nan')):.3f} | "
                f"acc {metrics.get('reward/accuracy', float('nan')):.2f} | "
                f"listener {metrics.get('reward/listener', float('nan')):.2f} | "
                f"contradiction {metrics.get('listener/contradiction_rate', float('nan')):.2f} | "
                f"{per_step:.1f} s/step | ETA {eta}")
        print(line, file=self.stream, flush=True)
        return line


def metric_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` over the rows that have it, NaNs left out, by step."""
    return sorted((int(r["step"]), float(r[key])) for r in rows if key in r and not math.isnan(float(r[key])))


def start_end(series: list[tuple[int, float]], window: int) -> tuple[float, float]:
    """Mean of the first and of the last `window` values (at most half the series each)."""
    k = max(1, min(window, len(series) // 2))
    values = [v for _, v in series]
    return sum(values[:k]) / k, sum(values[-k:]) / k


def summary_lines(rows: list[dict]) -> list[str]:
    """'held-out accuracy      0.41 -> 0.97' for every summary metric the run logged."""
    lines = []
    for key, label in SUMMARY_METRICS:
        series = metric_series(rows, key)
        if not series:
            continue
        first, last = start_end(series, 1 if key.startswith("eval") else SUMMARY_WINDOW)
        where = (f"(update {series[0][0]} -> {series[-1][0]})" if key.startswith("eval")
                 else f"(mean of the first/last {max(1, min(SUMMARY_WINDOW, len(series) // 2))} steps)")
        lines.append(f"{label:24} {first:.3f} -> {last:.3f}  {where}")
    return lines


def read_rows(metrics_file: Path) -> list[dict]:
    if not metrics_file.is_file():
        return []
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], out: Path) -> Path | None:
    """The summary metrics over steps, one panel each, to `out`; None when nothing was logged."""
    panels = [(key, label, metric_series(rows, key)) for key, label in SUMMARY_METRICS]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(11, 3.2 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax, (key, label, series) in zip(axes.flat, panels):
        ax.plot([s for s, _ in series], [v for _, v in series], marker="o" if key.startswith("eval") else None,
                markersize=3)
        ax.set(title=label, xlabel="updates applied" if key.startswith("eval") else "step")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
