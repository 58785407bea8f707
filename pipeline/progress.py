"""A one-line progress bar for training: step, reward, accuracy, contradiction rate, step time, ETA."""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO


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
                f"contradiction {metrics.get('listener/contradiction_rate', float('nan')):.2f} | "
                f"{per_step:.1f} s/step | ETA {eta}")
        print(line, file=self.stream, flush=True)
        return line
