"""The learner's lr schedule (actors/learner.py `lr_multiplier`): warm-up, cosine decay, floor."""

from __future__ import annotations

import math

import pytest

from actors.learner_setup import lr_multiplier


def test_warmup_then_constant_without_decay() -> None:
    assert [lr_multiplier(s, 3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(1000, 0) == 1.0


def test_cosine_decay_after_warmup_to_the_floor_by_hand() -> None:
    # warm-up 2, decay over 4 steps to 0.1: steps 2..6 are cos at progress 0, 1/4, 1/2, 3/4, 1
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert [lr_multiplier(s, 2, 4, 0.1) for s in range(2, 7)] == pytest.approx(expected)
    assert lr_multiplier(4, 2, 4, 0.1) == pytest.approx(0.55)  # half-way: the mean of 1 and 0.1
    assert lr_multiplier(100, 2, 4, 0.1) == pytest.approx(0.1)  # held at the floor after the decay
