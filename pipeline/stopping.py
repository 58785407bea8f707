"""Stopping a run on SIGTERM or Ctrl-C without cutting an MLflow write in half.

SIGTERM (`ray job stop`, Kubernetes) and SIGINT raise KeyboardInterrupt in the main thread, so the driver
unwinds as on Ctrl-C: the tracker flushes and marks the run KILLED, the actors stop. A signal that lands
inside `held_stop()` (a write to the MLflow store) is held until the block ends: an interrupt raised inside
SQLAlchemy's commit left the sqlite store locked, the final flush failed and the run stayed RUNNING.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0  # nesting of held_stop() blocks in the main thread
_held_signal: int | None = None


def stop_on_signals() -> None:
    """Install the handler for SIGTERM and SIGINT (call after `ray.init`, which sets a SIGTERM handler of its
    own that aborts the process). A no-op outside the main thread, where Python cannot set handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def _on_signal(signum: int, frame) -> None:
    global _held_signal
    if _depth:
        _held_signal = signum
        return
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def held_stop() -> Iterator[None]:
    """A block a stop signal does not interrupt: one that arrives meanwhile is raised when the block ends."""
    global _depth, _held_signal
    if threading.current_thread() is not threading.main_thread():
        yield  # signals are only delivered to the main thread
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _held_signal is not None:
            signum, _held_signal = _held_signal, None
            raise KeyboardInterrupt(f"signal {signum}")
