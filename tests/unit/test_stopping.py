"""SIGTERM stops the run like Ctrl-C, but never inside a held block (an MLflow write)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.stopping import held_stop, stop_on_signals


@pytest.fixture
def handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stop_on_signals()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_outside_a_held_block_raises_keyboard_interrupt_at_once(handlers):
    with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGTERM)}"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode, long before this ends


def test_a_signal_inside_a_held_block_is_raised_when_the_outermost_block_ends(handlers):
    steps = []
    with pytest.raises(KeyboardInterrupt, match=f"signal {int(signal.SIGINT)}"):
        with held_stop():
            with held_stop():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("inner write finished")
            steps.append("outer write finished")
        steps.append("not reached")
    assert steps == ["inner write finished", "outer write finished"]
    with held_stop():  # the held signal was consumed: the next block is not interrupted
        steps.append("next write")
    assert steps[-1] == "next write"
